"""One rank of the DeepSpeed ZeRO-3 test (`tests/test_deepspeed.py`), run with `DS_ACCELERATOR=cpu` by
`python -m torch.distributed.run --nproc_per_node=2 tests/dist_zero3_worker.py BASE OUT CACHE`.

`transformers.Trainer(model_init=inilora_init(BASE, variant="pissa"), args=TrainingArguments(deepspeed=ZeRO-3))`:
the Trainer's ZeRO-3 config makes `from_pretrained` partition the base as it loads. Right after the init both ranks
call `to_merged` (`OUT/merged-init`); then two SGD steps of the 4-row batch (2 rows per rank), saving
`checkpoint-1` and `checkpoint-2` (adapter + init metadata, gathered by the Trainer; `ExportCallback` exports into
`checkpoint-N/export/`); then `to_merged` / `to_lora` (`OUT/merged`, `OUT/lora`) and
`trainer.save_model(OUT/saved)`. Every rank writes `OUT/rank-{rank}.json` with the paths the exports returned,
whether the base weights were partitioned at init, the error `inilora_init` raises for a loaded model that ZeRO-3
partitioned, and the error of `to_merged` once no ZeRO-3 config is active.

With a 4th argument `resume`, a second run resumes from `OUT/run/checkpoint-1` into `OUT/resumed` (accelerate
takes one DeepSpeed plugin per process).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from inilora_hf import ExportCallback, inilora_init
from inilora_hf.convert import to_lora, to_merged
from inilora_hf.errors import UnsupportedShardingError

LEARNING_RATE = 1e-2
RANK = 4
ROWS, SEQ_LEN, VOCAB_SIZE = 4, 12, 128
#: ZeRO-3 with the Trainer's own optimizer (SGD) and the batch sizes / clipping taken from the TrainingArguments.
ZERO3 = {
    "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_allow_untested_optimizer": True,
}


def batch() -> torch.Tensor:
    """The global batch: 4 rows of 12 tokens (each rank takes 2 rows)."""
    return torch.randint(4, VOCAB_SIZE, (ROWS, SEQ_LEN), generator=torch.Generator().manual_seed(3))


def zero3_arguments(output_dir: Path) -> TrainingArguments:
    """Two SGD steps of 2 rows per rank under ZeRO-3, a checkpoint after each."""
    return TrainingArguments(
        output_dir=str(output_dir),
        deepspeed=ZERO3,
        per_device_train_batch_size=ROWS // 2,
        max_steps=2,
        learning_rate=LEARNING_RATE,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        save_strategy="steps",
        save_steps=1,
        report_to=[],
        seed=0,
        accelerator_config={"use_configured_state": True},
    )


def zero3_trainer(base: str, output_dir: Path, cache: str, **kwargs: Any) -> Trainer:
    """The Trainer on the 4-row batch with `model_init=inilora_init(base, variant="pissa")` under ZeRO-3 (one per
    process: accelerate accepts one DeepSpeed plugin per process)."""
    torch.set_num_threads(1)
    # Without an accelerator, accelerate's PartialState picks no backend for DeepSpeed and runs one process per rank
    # (world size 1); configured first with gloo (DeepSpeed initialises torch.distributed with it), the Trainer
    # uses that state: 2 processes, DistributedType.DEEPSPEED.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    ids = batch().tolist()
    return Trainer(
        model_init=inilora_init(base, variant="pissa", rank=RANK, cache_dir=cache),
        args=zero3_arguments(output_dir),
        train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
        data_collator=default_data_collator,
        **kwargs,
    )


def resume(base: str, out: str, cache: str) -> None:
    """Resume from `OUT/run/checkpoint-1` (DeepSpeed's partitioned weights and optimizer state) into
    `OUT/resumed`."""
    trainer = zero3_trainer(base, Path(out) / "resumed", cache)
    trainer.train(resume_from_checkpoint=str(Path(out) / "run" / "checkpoint-1"))


def main(base: str, out: str, cache: str) -> None:
    # ExportCallback gathers the partitions at every checkpoint: checkpoint-N/export/.
    trainer = zero3_trainer(base, Path(out) / "run", cache, callbacks=[ExportCallback()])
    partitioned = all(hasattr(p, "ds_id") for n, p in trainer.model.named_parameters() if "base_layer" in n)
    merged_init = to_merged(trainer.model, Path(out) / "merged-init")
    trainer.train()
    merged = to_merged(trainer.model, Path(out) / "merged")
    lora = to_lora(trainer.model, Path(out) / "lora")
    trainer.save_model(str(Path(out) / "saved"))
    try:  # a loaded model that the ZeRO-3 config partitioned as it loaded
        inilora_init(AutoModelForCausalLM.from_pretrained(base), variant="pissa", rank=RANK, use_cache=False)
        refusal = ""
    except UnsupportedShardingError as error:
        refusal = str(error)
    unset_hf_deepspeed_config()  # as once the Trainer and its arguments are gone: the partitions cannot be gathered
    try:
        to_merged(trainer.model, Path(out) / "merged-late")
        late = ""
    except UnsupportedShardingError as error:
        late = str(error)
    record = {
        "rank": trainer.args.process_index,
        "world_size": trainer.args.world_size,
        "partitioned": partitioned,
        "merged_init": str(merged_init),
        "merged": str(merged),
        "lora": str(lora),
        "partitioned_model_refused": refusal,
        "export_without_config_refused": late,
    }
    (Path(out) / f"rank-{trainer.args.process_index}.json").write_text(json.dumps(record, indent=2, sort_keys=True))


if __name__ == "__main__":
    (resume if sys.argv[4:] == ["resume"] else main)(*sys.argv[1:4])
