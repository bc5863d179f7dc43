"""Compute-path hygiene: an interrupted or failed compute leaves only its resumable groups (no empty work dirs,
no lock files), an existing factor set is never overwritten silently, every requested target must exist, and
the fit's progress bar says what its total counts."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from inilora_hf import FactorSet, InitConfig, TargetModuleError, inilora_init
from inilora_hf.cli.app import main
from inilora_hf.errors import OutputExistsError
from inilora_hf.factorsets import streaming
from inilora_hf.factorsets.cache import exclusive_lock
from inilora_hf.factorsets.fingerprint_memo import MEMO_DIR
from inilora_hf.factorsets.format import METADATA_NAME
from inilora_hf.factorsets.streaming import compute_streamed
from inilora_hf.factorsets.targets import find_target_linears
from tests.conftest import tiny_llama

REPO_ROOT = Path(__file__).resolve().parents[1]
RANK = 4
TARGETS = ["q_proj", "v_proj"]
#: Fit steps per group of the interrupted runs: 0.4-0.8 s per 64×64 group on one thread of the 2-core development
#: machine, so that a run polled every 10 ms is caught mid-fit, and the whole test takes seconds.
STEPS = 10_000
WAIT_S = 180

# Each group's fit is followed by a 3 s pause before its result is saved, so that the interrupt lands inside
# a group even when a loaded machine starves the test's polling loop (the factors are unchanged).
SLOW_GROUPS = """
import time
from inilora_hf.factorsets import compute, streaming
def _then_pause(run):
    def paused(*args, **kwargs):
        factors = run(*args, **kwargs)
        time.sleep(3)
        return factors
    return paused
streaming.run_variant = _then_pause(streaming.run_variant)
compute.run_variant = _then_pause(compute.run_variant)
"""

STREAM_SCRIPT = (
    SLOW_GROUPS
    + """
import sys
from inilora_hf import InitConfig
from inilora_hf.factorsets.streaming import compute_streamed
base, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = InitConfig("inilora", rank=4, target_modules=["q_proj", "v_proj"], options={"steps": steps})
compute_streamed(base, config, out, max_memory=1, device="cpu")
"""
)

INIT_SCRIPT = (
    SLOW_GROUPS
    + """
import sys
from inilora_hf import inilora_init
base, cache, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
inilora_init(base, variant="inilora", rank=4, steps=steps, device="cpu", cache_dir=cache).prepare()
"""
)


def _config(variant: str = "inilora", **options) -> InitConfig:
    return InitConfig(variant, rank=RANK, target_modules=TARGETS, options=options)


def _leftovers(directory: Path, *, besides: tuple[str, ...] = ()) -> list[str]:
    """What is in `directory` (nothing if it does not exist), except the names in `besides`."""
    return sorted(p.name for p in directory.iterdir() if p.name not in besides) if directory.exists() else []


def _interrupt(script: str, args: list[str], log: Path, ready: Callable[[], bool]) -> str:
    """Run `python -c script args` and send it a real SIGINT once `ready()` holds; return its stderr after
    checking that the interrupt, and nothing else, ended it."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as stderr:
        # SIGINT back to its default in the child: a runner started in the background (`cmd &` in a script) ignores
        # SIGINT, which its children inherit, and Python then never raises KeyboardInterrupt.
        process = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stderr=stderr,
            env=env,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        deadline = time.monotonic() + WAIT_S
        while not ready():
            assert process.poll() is None, f"the run ended before it was interrupted:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the run never got to the point of interruption"
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=WAIT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert process.returncode == -signal.SIGINT and "KeyboardInterrupt" in text, text[-3000:]
    return text


def _fit_started(log: Path) -> Callable[[], bool]:
    return lambda: log.exists() and "IniLoRA fit" in log.read_text()


def _assert_bit_identical(actual: Path, expected: Path) -> None:
    """Same factor tensors, and byte-identical safetensors files."""
    got, want = FactorSet.from_pretrained(actual), FactorSet.from_pretrained(expected)
    assert sorted(got.factors) == sorted(want.factors)
    for name, factors in want.factors.items():
        assert torch.equal(got.factors[name].lora_A, factors.lora_A), name
        assert torch.equal(got.factors[name].lora_B, factors.lora_B), name
    files = sorted(p.name for p in expected.glob("factors*.safetensors*"))
    assert files and files == sorted(p.name for p in actual.glob("factors*.safetensors*"))
    for name in files:
        assert (actual / name).read_bytes() == (expected / name).read_bytes(), name


# --------------------------------------------------------------------------------------------- interrupts


def test_sigint_during_streamed_compute_leaves_only_finished_groups_and_resumes_bit_identically(
    tiny_base_dir: Path, tmp_path: Path, isolated_factor_cache: Path
) -> None:
    cache, out = isolated_factor_cache, tmp_path / "out"
    args = [str(tiny_base_dir), str(out), str(STEPS)]

    # Interrupted in the first group: nothing to resume from, so nothing at all is left.
    log = tmp_path / "first.log"
    _interrupt(STREAM_SCRIPT, args, log, _fit_started(log))
    assert _leftovers(cache) == [], "no empty work dir and no lock file"
    assert _leftovers(tmp_path, besides=(cache.name,)) == ["first.log"]

    # Interrupted after a group finished: that group stays (the resumable state), nothing else.
    def group_finished() -> bool:
        return any(cache.glob(".partial-*/group-00000"))

    _interrupt(STREAM_SCRIPT, args, tmp_path / "second.log", group_finished)
    leftovers = _leftovers(cache)
    assert len(leftovers) == 1 and leftovers[0].startswith(".partial-") and not leftovers[0].endswith(".lock")
    groups = _leftovers(cache / leftovers[0])
    assert groups and all(re.fullmatch(r"group-\d{5}", name) for name in groups), groups
    assert all((cache / leftovers[0] / name / METADATA_NAME).is_file() for name in groups)
    assert len(groups) < 4 and not out.exists()

    resumed = compute_streamed(tiny_base_dir, _config(steps=STEPS), out, max_memory=1, device="cpu")
    assert resumed.info["streamed"]["resumed_groups"] == len(groups)
    assert _leftovers(cache) == [], "a finished run leaves no work dir and no lock file"
    reference = tmp_path / "reference"
    compute_streamed(
        tiny_base_dir, _config(steps=STEPS), reference, max_memory=1, device="cpu", work_dir=tmp_path / "reference-work"
    )
    _assert_bit_identical(out, reference)
    assert _leftovers(tmp_path, besides=(cache.name,)) == ["first.log", "out", "reference", "second.log"]


def test_sigint_during_in_memory_compute_leaves_no_lock_or_temp_dir(tiny_base_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    log = tmp_path / "init.log"
    _interrupt(INIT_SCRIPT, [str(tiny_base_dir), str(cache), str(STEPS)], log, _fit_started(log))
    # The remembered base-weight fingerprints are a finished, valid record; they may stay.
    assert _leftovers(cache, besides=(MEMO_DIR,)) == [], "neither the build's temp dir nor the key's lock file"

    rerun = inilora_init(tiny_base_dir, variant="inilora", rank=RANK, steps=STEPS, device="cpu", cache_dir=cache)
    rerun.prepare()
    assert rerun.factor_source == "computed"
    entries = _leftovers(cache, besides=(MEMO_DIR,))
    assert len(entries) == 1 and not entries[0].startswith(".") and not entries[0].endswith(".lock"), entries
    uncached = inilora_init(tiny_base_dir, variant="inilora", rank=RANK, steps=STEPS, device="cpu", use_cache=False)
    expected = uncached.prepare()
    for name, factors in expected.factors.items():
        assert torch.equal(rerun.factor_set.factors[name].lora_A, factors.lora_A), name
        assert torch.equal(rerun.factor_set.factors[name].lora_B, factors.lora_B), name


def test_failed_streamed_compute_leaves_no_work_dir_or_lock(
    tiny_base_dir: Path, tmp_path: Path, isolated_factor_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(*args, **kwargs):
        raise RuntimeError("simulated failure in the first group")

    monkeypatch.setattr(streaming, "run_variant", failing)
    with pytest.raises(RuntimeError, match="simulated failure"):
        compute_streamed(tiny_base_dir, _config(steps=50), tmp_path / "out", device="cpu")
    assert _leftovers(isolated_factor_cache) == []
    assert not (tmp_path / "out").exists()


def test_exclusive_lock_excludes_and_removes_its_file(tmp_path: Path) -> None:
    """Threads hammering one lock: never two inside at once although every holder removes the lock file, which
    waiters may have opened already; and no lock file afterwards."""
    lock_file = tmp_path / "key.lock"
    inside: list[int] = []
    overlaps: list[int] = []
    counter = [0]

    def work() -> None:
        for _ in range(100):
            with exclusive_lock(lock_file):
                overlaps.extend(inside)
                inside.append(1)
                value = counter[0]
                time.sleep(0.0005)  # widen the window in which a second holder would be noticed
                counter[0] = value + 1
                inside.pop()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT_S)
    assert overlaps == [] and counter[0] == 400
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------- overwrite


def test_existing_factor_set_is_refused_before_any_work_unless_overwrite(
    tiny_base_dir: Path, tmp_path: Path, isolated_factor_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    compute_streamed(tiny_base_dir, _config("inilora-alpha", seed=0), out, device="cpu")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    opened = []
    real = streaming.resolve_checkpoint
    monkeypatch.setattr(streaming, "resolve_checkpoint", lambda *a, **k: opened.append(a) or real(*a, **k))

    with pytest.raises(OutputExistsError) as refused:
        compute_streamed(tiny_base_dir, _config("inilora-alpha", seed=7), out, device="cpu")
    assert str(refused.value) == (
        f"{out} already holds a factor set; pass overwrite=True (command line: --overwrite) to replace it, or "
        "choose another output directory."
    )
    assert isinstance(refused.value, FileExistsError)
    assert opened == [], "refused before the base model is even opened"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    replaced = compute_streamed(tiny_base_dir, _config("inilora-alpha", seed=7), out, device="cpu", overwrite=True)
    assert FactorSet.from_pretrained(out).config.options["seed"] == 7 == replaced.config.options["seed"]
    assert _leftovers(tmp_path, besides=(isolated_factor_cache.name,)) == ["out"], "no temporary directories"
    assert _leftovers(isolated_factor_cache) == []

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="is not empty and holds no factor set"):
        compute_streamed(tiny_base_dir, _config("inilora-alpha"), busy, device="cpu", overwrite=True)
    assert _leftovers(busy) == ["notes.txt"]
    with pytest.raises(OutputExistsError, match="exists and is not a directory"):
        compute_streamed(tiny_base_dir, _config("inilora-alpha"), busy / "notes.txt", device="cpu", overwrite=True)


def test_factor_set_written_to_out_during_the_compute_is_not_replaced(
    tiny_base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "other"
    compute_streamed(tiny_base_dir, _config("inilora-alpha", seed=3), other, device="cpu")
    out = tmp_path / "out"
    real = streaming.run_variant

    def meanwhile(*args, **kwargs):  # another process publishes to `out` while this one computes
        if not out.exists():
            shutil.copytree(other, out)
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming, "run_variant", meanwhile)
    with pytest.raises(OutputExistsError, match="already holds a factor set"):
        compute_streamed(tiny_base_dir, _config("inilora-alpha"), out, device="cpu")
    assert FactorSet.from_pretrained(out).config.options["seed"] == 3


# ------------------------------------------------------------------------------------------------ targets


def _linear_suffixes(model: torch.nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def test_every_listed_target_must_match_in_memory() -> None:
    model = tiny_llama()
    suffixes = ", ".join(_linear_suffixes(model))
    with pytest.raises(TargetModuleError) as one:
        inilora_init(model, variant="lora", target_modules=["q_proj", "foo_proj"])()
    assert str(one.value) == (
        "'foo_proj' in target_modules=['foo_proj', 'q_proj'] matches no module of this LlamaForCausalLM; every name "
        f"must select at least one module: fix or remove it. Its Linear layers end in: {suffixes}."
    )
    with pytest.raises(TargetModuleError, match=r"^'bar', 'foo' in target_modules=\['bar', 'foo', 'v_proj'\] match no"):
        inilora_init(model, variant="lora", target_modules=["v_proj", "foo", "bar"])()
    with pytest.raises(TargetModuleError, match=r"target_modules='nomatch\.\*' matches no module"):
        inilora_init(model, variant="lora", target_modules="nomatch.*")()

    # Names that do match select what PEFT itself wraps: dotted suffixes, full names, regular expressions.
    for targets in (["q_proj", "self_attn.v_proj"], ["model.layers.1.mlp.up_proj"], r".*\.k_proj"):
        wrapped = get_peft_model(tiny_llama(), LoraConfig(r=RANK, target_modules=targets))
        expected = [n.removeprefix("base_model.model.") for n, m in wrapped.named_modules() if isinstance(m, LoraLayer)]
        assert sorted(find_target_linears(model, targets)) == sorted(expected) and expected, targets


def test_every_listed_target_must_match_when_streamed(
    tiny_base_dir: Path, tmp_path: Path, isolated_factor_cache: Path, capsys: pytest.CaptureFixture
) -> None:
    config = InitConfig("inilora-alpha", rank=RANK, target_modules=["q_proj", "foo_proj"])
    with pytest.raises(TargetModuleError, match=r"^'foo_proj' in target_modules=\['foo_proj', 'q_proj'\] matches no"):
        compute_streamed(tiny_base_dir, config, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists() and _leftovers(isolated_factor_cache) == []

    argv = [
        "compute",
        str(tiny_base_dir),
        "--out",
        str(tmp_path / "out"),
        "--variant",
        "inilora-alpha",
        "--targets",
        "q_proj,foo_proj",
        "--device",
        "cpu",
    ]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'foo_proj'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- progress bar


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj"]])
def test_fit_progress_bar_label_agrees_with_its_total(targets: list[str], capsys: pytest.CaptureFixture) -> None:
    model = tiny_llama()
    steps = 300
    inilora_init(
        model, variant="inilora", rank=RANK, target_modules=targets, steps=steps, use_cache=False, device="cpu"
    ).prepare()
    shapes = {tuple(m.weight.shape) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets}
    bars = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if "IniLoRA fit" in line]
    assert bars, "the fit shows a progress bar"
    total = len(shapes) * steps
    label = (
        f"IniLoRA fit: {len(shapes)} shape groups × {steps} steps" if len(shapes) > 1 else f"IniLoRA fit: {steps} steps"
    )
    assert bars[-1].startswith(f"{label}: 100%") and f" {total}/{total} " in bars[-1], bars[-1]
