"""Two `torchrun` ranks on CPU (gloo), each with `Trainer(model_init=inilora_init(...))`: the factor set is
computed once (the cache's file lock makes the other rank wait and load it), every rank starts from the same
A, B and R, and R does not change during training."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = REPO_ROOT / "tests" / "dist_worker.py"
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchrun(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run torchrun in its own process group, killed as a whole if it outlives TIMEOUT_S."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(WORKER),
        *args,
    ]
    process = subprocess.Popen(
        command,
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"torchrun did not finish within {TIMEOUT_S} s:\n{output[-6000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, output, "")


def test_two_ranks_compute_once_and_start_identical(tiny_base_dir: Path, tmp_path: Path) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    out.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "TORCHELASTIC_ERROR_FILE": str(tmp_path / "error.json"),
    }
    result = _torchrun(str(tiny_base_dir), str(out), str(cache), env=env)
    assert result.returncode == 0, result.stdout[-6000:]

    ranks = [json.loads((out / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    sources = sorted(r["factor_source"] for r in ranks)
    assert sources[0] == "cache:" + next(p.name for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert sources[1] == "computed", f"exactly one rank computes the factor set, got {sources}"

    init = ranks[0]["init"]
    assert len(init) == 4, "q_proj and v_proj of 2 layers"
    assert ranks[1]["init"] == init, "every rank starts from the same A, B and R"
    assert ranks[1]["trained"] == ranks[0]["trained"], "DDP keeps the ranks in sync"
    for name, hashes in init.items():
        trained = ranks[0]["trained"][name]
        assert trained["R"] == hashes["R"], f"the residual of {name} changed during training"
        assert (trained["A"], trained["B"]) != (hashes["A"], hashes["B"]), f"{name}: the LoRA factors did not train"
