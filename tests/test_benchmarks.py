"""The benchmarks' shared rules (`benchmarks/harness.py`): threads pinned here and in subprocesses, compared
methods interleaved, min and median reported, the thread count stated. No timing is asserted."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmarks import approx
from benchmarks.harness import THREAD_VARIABLES, interleaved, min_median, pin_threads

BENCHMARKS = ("approx", "trainer_overhead", "streaming", "quantized_fidelity", "data_driven")


@pytest.fixture
def restore_threads():
    """Start without the thread variables; afterwards restore them and torch's intra-op count (`pin_threads`
    writes `os.environ` directly, which monkeypatch would not undo for a variable that was absent)."""
    saved = {variable: os.environ.pop(variable, None) for variable in THREAD_VARIABLES}
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)
    for variable, value in saved.items():
        if value is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = value


def test_interleaved_runs_every_method_once_per_repeat_starting_one_further_each_time():
    calls: list[str] = []

    def method(name: str):
        return lambda: calls.append(name) or len(calls)

    results = interleaved({name: method(name) for name in "abc"}, repeats=4)
    assert calls == list("abcbcacababc")
    assert results == {"a": [1, 6, 8, 10], "b": [2, 4, 9, 11], "c": [3, 5, 7, 12]}


def test_min_median_matches_numpy():
    values = [0.31, 0.12, 0.57, 0.12, 0.98, 0.44]
    assert min_median(values) == (np.min(values), np.median(values))


def test_pinned_threads_reach_subprocesses(restore_threads):
    # An unpinned subprocess uses one thread per core (OpenMP caps larger requests at that), so 1 tells them
    # apart on any machine with 2 or more cores.
    threads = 1
    pin_threads(threads)
    assert torch.get_num_threads() == threads
    child = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.strip() == str(threads)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_has_a_threads_flag_defaulting_to_one(name, capsys):
    module = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert re.search(r"--threads THREADS\s+torch intra-op threads \(default 1:", help_text)


def test_approx_runs_interleaved_with_pinned_threads_and_reports_min_median(restore_threads, capsys):
    approx.main(["--shapes", "tiny", "--steps", "3", "--repeats", "2", "--threads", "2"])
    out = capsys.readouterr().out
    assert torch.get_num_threads() == 2
    assert "threads=2 pinned with --threads" in out
    assert "2 interleaved repeats, min and median" in out
    header, _rule, *rows = [line for line in out.splitlines() if line.startswith("|")]
    assert "| min (s) | median (s) |" in header
    cells = {row.split(" | ")[0].lstrip("| "): row.split(" | ") for row in rows}
    assert set(cells) == {approx.REFERENCE, approx.ADAM_FIT, approx.SVD, approx.RSVD} | {
        f'PEFT init_lora_weights="{init}"' for init in approx.PEFT_INITS
    }
    # The exact-SVD row's mean MSE is the rank-8 optimum, computed here independently with numpy.
    _label, _names, weights = approx._tiny()
    optimum = np.mean(
        [np.sum(np.linalg.svd(W.double().numpy(), compute_uv=False)[approx.RANK :] ** 2) / W.numel() for W in weights]
    )
    mse_column = header.split(" | ").index("mean MSE")
    # Printed with 5 significant digits: rounding is at most 5e-5 relative; fp32 vs fp64 SVD adds ~1e-6.
    assert float(cells[approx.SVD][mse_column]) == pytest.approx(optimum, rel=1e-4)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--threads", "0"], "argument --threads: must be a positive integer, got 0"),
        (["--shapes", "tiny,huge"], "unknown shape set(s) huge; choose from tiny, minilm, llama7b"),
    ],
)
def test_approx_rejects_bad_arguments_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        approx.main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)
