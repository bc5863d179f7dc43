"""One rank of the FSDP test (`tests/test_fsdp.py`), run by
`python -m torch.distributed.run --nproc_per_node=2 tests/dist_fsdp_worker.py BASE OUT CACHE`.

Every rank builds the model with `inilora_init` (the factor set computed across the ranks), shards it with FSDP2
(`fully_shard` per decoder layer and at the root, gloo on CPU), takes one SGD step on its half of a 4-row batch,
then both ranks call `to_merged` and `to_lora`, and `ExportCallback.on_train_end` (into `OUT/run/export`). Rank 0
also saves the full state dict gathered by torch's own `get_model_state_dict(full_state_dict=True)` to
`OUT/full_state.pt`, and the model with it as `Trainer.save_model` does under FSDP2 (`OUT/saved`). Every rank
writes `OUT/rank-{rank}.json`: the sha256 of A, B and R of each LoRA layer before sharding, and the paths the
exports returned.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import TrainerControl, TrainerState, TrainingArguments

from inilora_hf import ExportCallback, inilora_init
from inilora_hf.convert import to_lora, to_merged
from tests.dist_worker import lora_hashes

FIT_STEPS = 50
LEARNING_RATE = 1e-2
ROWS, SEQ_LEN, VOCAB_SIZE = 4, 12, 128


def batch() -> torch.Tensor:
    """The global batch: 4 rows of 12 tokens (each rank takes 2 rows)."""
    return torch.randint(4, VOCAB_SIZE, (ROWS, SEQ_LEN), generator=torch.Generator().manual_seed(3))


def main(base: str, out: str, cache: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = inilora_init(base, variant="inilora", steps=FIT_STEPS, cache_dir=cache)()
    at_init = lora_hashes(model)
    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    rows = batch().chunk(world_size)[rank]
    model(input_ids=rows, labels=rows).loss.backward()  # FSDP averages the gradients of the ranks
    optimizer.step()
    merged = to_merged(model, Path(out) / "merged")
    lora = to_lora(model, Path(out) / "lora")
    # What the Trainer does at the end of training with this callback (it calls it on every rank).
    args = TrainingArguments(output_dir=str(Path(out) / "run"), use_cpu=True, report_to=[])
    ExportCallback().on_train_end(args, TrainerState(is_world_process_zero=rank == 0), TrainerControl(), model=model)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(full, Path(out) / "full_state.pt")
        # Trainer.save_model under FSDP2: the full state dict gathered on every rank, saved by the main process.
        model.save_pretrained(Path(out) / "saved", state_dict=full, is_main_process=True)
    record = {"rank": rank, "init": at_init, "merged": str(merged), "lora": str(lora)}
    (Path(out) / f"rank-{rank}.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
