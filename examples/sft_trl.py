"""Fine-tune a causal LM with TRL's SFTTrainer from an IniLoRA init, then export standard checkpoints.

    python examples/sft_trl.py                       # tiny model built locally, shipped demo data
    python examples/sft_trl.py --model ./my-llama --variant inilora-beta --fit-steps 20000
    python examples/sft_trl.py --overwrite            # run again, replacing the exports of the first run

Copy this file as the starting point of your own run.
"""

import argparse

import torch
from transformers import AutoTokenizer
from trl import SFTConfig

from inilora_hf import SFTTrainer, inilora_init
from inilora_hf.cli.demo import build_demo_base, demo_dataset
from inilora_hf.convert import to_lora, to_merged
from inilora_hf.output_dirs import check_output_dir

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None, help="Hub id or directory (default: a tiny Llama built locally)")
parser.add_argument("--variant", default="inilora")
parser.add_argument("--rank", type=int, default=8)
parser.add_argument("--fit-steps", type=int, default=2000, help="IniLoRA Adam steps (paper: 20000)")
parser.add_argument("--output-dir", default="sft-out")
parser.add_argument("--overwrite", action="store_true", help="replace the merged/ and lora/ of an earlier run")
args = parser.parse_args()
for export in ("merged", "lora"):  # refused now rather than after training
    check_output_dir(f"{args.output_dir}/{export}", overwrite=args.overwrite)

model_path = args.model or str(build_demo_base(f"{args.output_dir}/base"))
tokenizer = AutoTokenizer.from_pretrained(model_path)
options = {"steps": args.fit_steps} if args.variant == "inilora" else {}

# 1. The init: computed once (and cached), reused by every re-initialisation the trainer does.
init = inilora_init(model_path, variant=args.variant, rank=args.rank, dtype=torch.float32, **options)

# 2. Train with model_init, exactly like transformers.Trainer.
trainer = SFTTrainer(
    model_init=init,
    args=SFTConfig(
        output_dir=f"{args.output_dir}/run",
        max_steps=30,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
    ),
    train_dataset=demo_dataset(),
    processing_class=tokenizer,
)
trainer.train()
print(trainer.model.init_report.summary())

# 3. Results that load without inilora_hf: a merged transformers checkpoint and a plain PEFT adapter
#    for the ORIGINAL base model (PeftModel.from_pretrained(base, f"{args.output_dir}/lora")).
to_merged(trainer.model, f"{args.output_dir}/merged", tokenizer=tokenizer, overwrite=args.overwrite)
to_lora(trainer.model, f"{args.output_dir}/lora", overwrite=args.overwrite)
trainer.model.factor_set.save_pretrained(f"{args.output_dir}/factors")
print(f"wrote {args.output_dir}/merged, {args.output_dir}/lora and {args.output_dir}/factors")
