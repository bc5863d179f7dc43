"""One rank of the factor-set-across-ranks tests (`tests/test_distributed_compute.py`), run by
`python -m torch.distributed.run --nproc_per_node=2 tests/dist_compute_worker.py MODE BASE OUT CACHE`.

MODE `compute`: `inilora_init(...).prepare()` for `inilora` (twice: the second is a cache hit) and for `lora-sb`
(calibration rows below), plus the calibration gradients summed across ranks (rank 0 saves them to
`OUT/gradients.pt`). MODE `die`: as `compute`, but rank 1 exits in the middle of its fit. MODE `disagree`: rank 1
asks for another LoRA rank. Every rank writes `OUT/rank-{rank}.json`: per factor set its source, sha256 per
module factor, and `info["distributed"]`; or the error it raised and how long it took.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from inilora_hf import inilora_init
from inilora_hf.factorsets import distributed
from inilora_hf.factorsets.distributed import current_ranks
from inilora_hf.factorsets.fingerprint import tensor_sha256
from inilora_hf.training.calibration import calibration_set
from inilora_hf.training.rank_gradients import estimate_gradients_across_ranks

VOCAB_SIZE = 128
INILORA_STEPS = 200
LORA_SB_ETA = 1e-3
CALIBRATION_BATCH = 2


def calibration_rows() -> list[dict[str, list[int]]]:
    """8 rows of 12 random tokens with labels: 4 calibration batches of 2."""
    ids = torch.randint(4, VOCAB_SIZE, (8, 12), generator=torch.Generator().manual_seed(1)).tolist()
    return [{"input_ids": row, "labels": row, "attention_mask": [1] * len(row)} for row in ids]


def describe(init) -> dict:
    factor_set = init.factor_set
    return {
        "source": init.factor_source,
        "factors": {
            name: {"A": tensor_sha256(f.lora_A), "B": tensor_sha256(f.lora_B)} for name, f in factor_set.factors.items()
        },
        "distributed": factor_set.info.get("distributed"),
    }


def main(mode: str, base: str, out: str, cache: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # a lost rank fails the others within a minute
    rank = dist.get_rank()
    record: dict = {"rank": rank}
    if mode == "die" and rank == 1:
        distributed.run_variant = lambda *args, **kwargs: os._exit(3)  # dies mid-compute, no cleanup
    started = time.perf_counter()
    try:
        inilora = inilora_init(
            base,
            variant="inilora",
            rank=4 if mode == "disagree" and rank == 1 else 8,
            steps=INILORA_STEPS,
            cache_dir=cache,
        )
        inilora.prepare()
        record["inilora"] = describe(inilora)
        again = inilora_init(base, variant="inilora", steps=INILORA_STEPS, cache_dir=cache)
        again.prepare()  # a cache hit: rank 0 reads the entry and sends it to the others
        record["inilora_again"] = describe(again)
        rows = calibration_rows()
        lora_sb = inilora_init(
            base,
            variant="lora-sb",
            eta=LORA_SB_ETA,
            calibration_data=rows,
            calibration_batch_size=CALIBRATION_BATCH,
            cache_dir=cache,
        )
        lora_sb.prepare()
        record["lora_sb"] = describe(lora_sb)
        calibration = calibration_set(rows, samples=len(rows), batch_size=CALIBRATION_BATCH)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        names = sorted(lora_sb.factor_set.factors)
        gradients = estimate_gradients_across_ranks(
            current_ranks(), model, calibration.batches, names, sample_counts=calibration.sample_counts
        )
        if rank == 0:
            torch.save(gradients, Path(out) / "gradients.pt")
    except Exception as error:
        record["error"] = {"type": type(error).__name__, "message": str(error)}
    record["seconds"] = time.perf_counter() - started
    (Path(out) / f"rank-{rank}.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    dist.destroy_process_group()
    sys.exit(1 if "error" in record else 0)


if __name__ == "__main__":
    main(*sys.argv[1:5])
