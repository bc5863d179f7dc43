"""The `inilora-hf` console script: the demo the README promises, inspect, convert, and error exits."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from inilora_hf.cli.app import main
from inilora_hf.cli.demo import build_demo_base


def test_demo_runs_end_to_end_and_reports(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--output-dir", str(tmp_path / "demo"), "--steps", "300", "--train-steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "init: variant=inilora rank=8" in out and "max reconstruction error over 4 modules" in out
    losses = re.search(r"training: 4 steps in [\d.]+ s, loss ([\d.]+) -> ([\d.]+)", out)
    assert losses is not None
    diff = float(re.search(r"max \|Δlogits\| = ([\d.e+-]+)", out).group(1))
    assert diff <= 1e-4
    for folder in ("factors", "adapter", "merged", "lora"):
        assert (tmp_path / "demo" / folder).is_dir()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "demo" / "merged")
    assert merged.config.model_type == "llama"


def test_console_script_is_installed_and_inspect_prints_the_fit_table(tmp_path: Path) -> None:
    from inilora_hf import inilora_init

    base = build_demo_base(tmp_path / "base")
    inilora_init(base, variant="pissa", rank=4).prepare().save_pretrained(tmp_path / "fs")
    script = shutil.which("inilora-hf") or str(Path(sys.executable).with_name("inilora-hf"))
    run = subprocess.run([script, "inspect", str(tmp_path / "fs")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "variant: pissa   rank: 4" in run.stdout
    assert re.search(r"model\.layers\.1\.self_attn\.v_proj\s+32x64\s+\S+\s+\S+\s+1\.0000", run.stdout)


def test_errors_exit_2_with_the_message(tmp_path: Path, capsys) -> None:
    assert main(["inspect", str(tmp_path)]) == 2
    assert "No inilora_factors.json" in capsys.readouterr().err
    assert main(["compute", str(tmp_path), "--out", str(tmp_path / "o"), "--variant", "nope"]) == 2
    assert "Unknown init variant 'nope'" in capsys.readouterr().err


def test_convert_command_writes_both_standard_forms(tmp_path: Path, capsys) -> None:
    from inilora_hf import inilora_init

    base = build_demo_base(tmp_path / "base")
    model = inilora_init(base, variant="inilora-beta", rank=4)()
    model.save_pretrained(tmp_path / "ckpt")
    assert (
        main(["convert", str(tmp_path / "ckpt"), "--merged", str(tmp_path / "m"), "--lora", str(tmp_path / "l")]) == 0
    )
    ids = torch.randint(4, 20, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        actual = AutoModelForCausalLM.from_pretrained(tmp_path / "m")(input_ids=ids).logits
    assert (expected - actual).abs().max() <= 1e-4
    assert (tmp_path / "l" / "adapter_config.json").is_file()
