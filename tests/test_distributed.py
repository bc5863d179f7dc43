"""Two `torchrun` ranks on CPU (gloo), each with `Trainer(model_init=inilora_init(...))`: the ranks split the
target modules, rank 0 writes the factor set into the cache once, every rank starts from the same A, B and R, and
R does not change during training."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import REPO_ROOT, torchrun, torchrun_env

WORKER = REPO_ROOT / "tests" / "dist_worker.py"


def test_two_ranks_compute_once_and_start_identical(tiny_base_dir: Path, tmp_path: Path) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    out.mkdir()
    result = torchrun(str(WORKER), str(tiny_base_dir), str(out), str(cache), env=torchrun_env(tmp_path))
    assert result.returncode == 0, result.stdout[-6000:]

    ranks = [json.loads((out / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["factor_source"] for r in ranks] == ["computed", "computed"], "both ranks compute a share"
    assert len([p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]) == 1, "written once"
    split = ranks[0]["distributed"]
    assert ranks[1]["distributed"] == split and split["world_size"] == 2
    shares = [share["modules"] for share in split["ranks"]]
    peft_names = sorted(name.removeprefix("base_model.model.") for name in ranks[0]["init"])
    assert all(shares) and sorted(shares[0] + shares[1]) == peft_names, f"a split of the modules: {shares}"

    init = ranks[0]["init"]
    assert len(init) == 4, "q_proj and v_proj of 2 layers"
    assert ranks[1]["init"] == init, "every rank starts from the same A, B and R"
    assert ranks[1]["trained"] == ranks[0]["trained"], "DDP keeps the ranks in sync"
    for name, hashes in init.items():
        trained = ranks[0]["trained"][name]
        assert trained["R"] == hashes["R"], f"the residual of {name} changed during training"
        assert (trained["A"], trained["B"]) != (hashes["A"], hashes["B"]), f"{name}: the LoRA factors did not train"
