"""One rank of the multi-process test (`tests/test_distributed.py`): a CPU/gloo `transformers.Trainer` whose
`model_init` is `inilora_init`, run by `python -m torch.distributed.run --nproc_per_node=2`.

Usage: python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker.py BASE_DIR OUT_DIR CACHE_DIR

Writes `OUT_DIR/rank-{rank}.json`: where the factor set came from (`"computed"` or `"cache:<key>"`) and the
sha256 of every target module's lora_A, lora_B and base weight (the residual R) right after init and after
training.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft.tuners.lora import LoraLayer
from transformers import Trainer, TrainingArguments

from inilora_hf import inilora_init
from inilora_hf.factorsets.fingerprint import tensor_sha256

VOCAB_SIZE = 128


def lora_hashes(model: torch.nn.Module) -> dict[str, dict[str, str]]:
    """Per LoRA layer: sha256 of its A, B and base weight (R for residual variants)."""
    return {
        name: {
            "A": tensor_sha256(layer.lora_A["default"].weight),
            "B": tensor_sha256(layer.lora_B["default"].weight),
            "R": tensor_sha256(layer.get_base_layer().weight),
        }
        for name, layer in model.named_modules()
        if isinstance(layer, LoraLayer)
    }


def main(base: str, out: str, cache: str) -> None:
    torch.set_num_threads(1)
    args = TrainingArguments(
        output_dir=str(Path(out) / "trainer"),
        use_cpu=True,
        ddp_backend="gloo",
        ddp_timeout=120,  # a rank that dies makes the others fail within 2 minutes instead of 30
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB_SIZE, (16, 12), generator=generator).tolist()
    dataset = Dataset.from_dict({"input_ids": ids, "labels": ids, "attention_mask": [[1] * 12 for _ in ids]})

    init = inilora_init(base, variant="inilora", steps=200, cache_dir=cache)
    trainer = Trainer(model_init=init, args=args, train_dataset=dataset)
    at_init = lora_hashes(trainer.model)  # Trainer.__init__ called model_init; nothing has trained yet
    result = trainer.train()
    record = {
        "rank": args.process_index,
        "world_size": args.world_size,
        "factor_source": init.factor_source,
        "distributed": init.factor_set.info.get("distributed") if init.factor_set is not None else None,
        "init": at_init,
        "trained": lora_hashes(trainer.model),
        "train_loss": result.training_loss,
    }
    path = Path(out) / f"rank-{args.process_index}.json"
    path.write_text(json.dumps(record, indent=2, sort_keys=True))
    # Leave the process group before exit: gloo's threads torn down at interpreter exit can abort a rank (SIGABRT).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
