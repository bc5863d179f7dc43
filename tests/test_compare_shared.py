"""Several processes sharing one `compare` folder: each run is done once (claimed through its lock), a run held by
another process is waited for, and a leftover work folder is removed only when no process is running its run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inilora_hf.cli.demo import build_demo_base
from inilora_hf.comparison.records import RunStore

WORKER = """
import logging, pathlib, sys, time
import torch
torch.set_num_threads(1)
from inilora_hf import compare
from inilora_hf.log import get_logger
get_logger("inilora_hf.comparison").setLevel(logging.INFO)
base, data, out, ready, go = sys.argv[1:6]
pathlib.Path(ready).touch()
while not pathlib.Path(go).exists():
    time.sleep(0.05)
compare(base, data, task="seq-cls", text_field="sentence", label_field="parity", variants=["lora", "pissa"],
        seeds=[0, 1], output_dir=out, max_steps=3, batch_size=8, resamples=500)
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("shared")
    rows = [
        {"sentence": f"add {a} {b} = {a + b}", "parity": "odd" if (a + b) % 2 else "even"}
        for a in range(9)
        for b in range(9)
    ]
    data = folder / "parity.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return build_demo_base(folder / "base"), data


def _check_running(workers: list[subprocess.Popen], deadline: float) -> None:
    assert time.monotonic() < deadline, "the workers took more than 5 minutes"
    for worker in workers:
        if worker.poll() is not None:
            raise AssertionError(f"a worker exited early ({worker.returncode}): {worker.communicate()[1]}")


def test_two_processes_share_the_runs_and_wait_for_a_held_one(files: tuple[Path, Path], tmp_path: Path) -> None:
    base, data = files
    out = tmp_path / "cmp"
    out.mkdir()
    store = RunStore(out)
    held = store.claim("lora", 0, wait=False)  # as if a third process were running lora × seed 0
    assert held is not None
    go = tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    workers = []
    for index in range(2):
        command = [
            sys.executable,
            "-c",
            WORKER,
            str(base),
            str(data),
            str(out),
            str(tmp_path / f"ready{index}"),
            str(go),
        ]
        workers.append(subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.monotonic() + 300
        while not all((tmp_path / f"ready{index}").exists() for index in range(2)):
            _check_running(workers, deadline)
            time.sleep(0.1)
        go.touch()  # both start `compare` now
        while len(list((out / "runs").glob("*.json"))) < 3:  # every run but the held one
            _check_running(workers, deadline)
            time.sleep(0.1)
        time.sleep(1.0)
        assert not store.finished("lora", 0) and all(worker.poll() is None for worker in workers)  # both wait
    finally:
        with held:
            pass  # released: one of the waiting processes runs it, the other finds it finished
    logs = [worker.communicate(timeout=300)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], logs
    joined = "".join(logs)
    for variant in ("lora", "pissa"):
        for seed in (0, 1):
            assert joined.count(f"finished {variant} seed {seed}:") == 1, joined  # each run done once
    for log in logs:
        assert "lora seed 0 is running in another process; waiting for it at the end." in log
    results = json.loads((out / "results.json").read_text())
    assert [(run["variant"], run["seed"]) for run in results["runs"]] == [
        ("lora", 0),
        ("pissa", 0),
        ("lora", 1),
        ("pissa", 1),
    ]
    assert results["summary"]["pissa"]["accuracy"]["n"] == 2 and results["paired"]["pissa"]["accuracy"]["seeds"] == [
        0,
        1,
    ]
    assert not list(out.glob(".lock-*")) and not list(out.glob(".tmp-run-*")) and not list(out.glob(".*.tmp"))


def test_a_leftover_work_folder_is_removed_only_when_its_run_is_not_running(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "cmp")
    config = {"model": "m", "variants": ["lora"], "seeds": [0]}
    store.start(config)
    running, interrupted = store.work_dir("inilora-alpha", 3), store.work_dir("lora", 0)
    held = store.claim("inilora-alpha", 3, wait=False)
    assert held is not None and store.claim("inilora-alpha", 3, wait=False) is None
    with held:
        store.start(config)  # another process resuming the folder
        assert running.is_dir() and not interrupted.exists()
    store.start(config)
    assert not running.exists() and not list(store.root.glob(".lock-*"))
