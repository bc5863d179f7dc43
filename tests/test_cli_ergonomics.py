"""The `inilora-hf` command line for a newcomer: instant --help and argument errors, documented options, output
folders refused before any work (and replaced whole with --overwrite), Ctrl-C as one line, readable tables."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inilora_hf.cli.app import BUILTIN_VARIANTS, INTERRUPTED_EXIT_CODE, build_parser, main
from inilora_hf.errors import OutputExistsError
from inilora_hf.output_dirs import check_output_dir, replacing_output_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
HEAVY_MODULES = ("torch", "transformers", "peft", "trl", "datasets", "safetensors")
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"  # of apache.org's LICENSE-2.0.txt


def console_script() -> str:
    return shutil.which("inilora-hf") or str(Path(sys.executable).with_name("inilora-hf"))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: equal snapshots mean nothing was touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def subcommand_parsers() -> dict[str, object]:
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return {"inilora-hf": parser, **subparsers.choices}


# ------------------------------------------------------------------------------------------ startup cost


def test_help_and_argument_errors_import_no_heavy_library(tmp_path: Path) -> None:
    """`import inilora_hf.cli.app`, every --help, argument errors and existing-output refusals load none of torch,
    transformers, peft, trl, datasets (these imports are what took 8-10 s)."""
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    calls = [
        ["--help"],
        *([name, "--help"] for name in subcommand_parsers() if name != "inilora-hf"),
        [],
        ["compute"],
        ["demo", "--rank", "eight"],
        ["convert", "ckpt"],
        ["nope"],
        ["demo", "--output-dir", str(existing)],
        ["convert", "ckpt", "--lora", str(existing)],
    ]
    script = f"""
import contextlib, io, json, sys
import inilora_hf.cli.app
heavy = {{"import": sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules)}}
for argv in {json.dumps(calls)}:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            code = inilora_hf.cli.app.main(argv)
        except SystemExit as exit:
            code = exit.code
    heavy[" ".join(argv)] = [code, sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules), err.getvalue()]
print(json.dumps(heavy))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout)
    assert results.pop("import") == []
    for argv, (code, loaded, err) in results.items():
        assert loaded == [], f"`inilora-hf {argv}` imported {loaded}"
        if argv.endswith("--help"):
            assert code == 0 and err == ""
        else:
            assert code == 2 and len(err.splitlines()) == 1, (argv, err)
    assert "invalid int value: 'eight'" in results["demo --rank eight"][2]
    assert "nothing to write: pass --merged DIR and/or --lora DIR" in results["convert ckpt"][2]
    for argv in (f"demo --output-dir {existing}", f"convert ckpt --lora {existing}"):
        assert str(existing) in results[argv][2] and "--overwrite" in results[argv][2]
    assert (existing / "keep.txt").read_text() == "mine" and len(list(existing.iterdir())) == 1


def test_builtin_variant_names_in_help_are_the_registered_ones() -> None:
    """The CLI lists variants without importing the registry; the list must equal the registry's built-ins (asked in a
    fresh process: this test session also registers test-only variants)."""
    script = "import inilora_hf, json; print(json.dumps(inilora_hf.available_variants()))"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert list(BUILTIN_VARIANTS) == json.loads(run.stdout.splitlines()[-1])


def test_public_names_resolve_and_match_all() -> None:
    """The package imports its public names lazily: each name of `__all__` resolves, and nothing else is public."""
    import inilora_hf

    assert set(inilora_hf._LAZY_EXPORTS) | {"__version__"} <= set(inilora_hf.__all__)
    for name in inilora_hf.__all__:
        assert getattr(inilora_hf, name) is not None, name
    assert inilora_hf.inilora_init.__module__ == "inilora_hf.training.model_init"
    assert inilora_hf.convert.export.to_merged.__module__ == "inilora_hf.convert.export"  # submodules stay attributes
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        inilora_hf.not_a_name  # noqa: B018


# ------------------------------------------------------------------------------------------ --help


def test_every_option_has_help_with_its_default_and_variants_are_listed() -> None:
    for name, parser in subcommand_parsers().items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.dest == "help" or action.__class__.__name__ == "_SubParsersAction":
                continue
            text = formatter._expand_help(action) if action.help else ""
            assert text, f"{name} {action.option_strings or action.dest} has no help"
            takes_value = action.option_strings and action.nargs != 0
            if takes_value and not action.required:
                assert "(default: " in text, f"{name} {action.option_strings}: no default in {text!r}"
                if action.default not in (None, []):
                    assert f"(default: {action.default})" in text, f"{name} {action.option_strings}: {text!r}"
    for name in ("demo", "compute"):
        help_text = subcommand_parsers()[name].format_help()
        listed = " ".join(help_text.split())
        assert all(variant in listed for variant in BUILTIN_VARIANTS), listed


# ------------------------------------------------------------------------------------------ output folders


def test_demo_reruns_refuse_then_overwrite_replaces_the_whole_folder(tmp_path: Path, capsys) -> None:
    out, cache = tmp_path / "demo", tmp_path / "cache"
    argv = ["demo", "--output-dir", str(out), "--variant", "pissa", "--train-steps", "2", "--cache-dir", str(cache)]
    assert main(argv) == 0
    first = snapshot(out)
    assert {
        "base/config.json",
        "adapter/adapter_config.json",
        "merged/model.safetensors",
        "lora/adapter_config.json",
        "factors/inilora_factors.json",
    } <= set(first)
    capsys.readouterr()

    assert main(argv) == 2  # the README's command, run again: refused before anything is written
    err = capsys.readouterr().err
    assert err == (
        f"inilora-hf demo: error: {out} already exists and is not empty; replace it with --overwrite "
        "(overwrite=True in Python), or choose another folder.\n"
    )
    assert snapshot(out) == first

    # A failing --overwrite run keeps the previous folder as it was (no half-replaced mix).
    assert main([*argv, "--overwrite", "--model", str(tmp_path / "no-such-model")]) == 2
    assert str(tmp_path / "no-such-model") in capsys.readouterr().err
    assert snapshot(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "demo"]

    (out / "stale-file-of-the-old-run.txt").write_text("old")
    assert main([*argv, "--overwrite"]) == 0
    second = snapshot(out)
    assert set(second) == set(first)  # the stale file is gone: a whole new folder, not the old one patched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "demo"]
    adapter_config = json.loads(second["adapter/adapter_config.json"])
    assert Path(adapter_config["base_model_name_or_path"]) == out / "base"  # recorded paths point into the folder


def test_compute_refuses_an_existing_factor_set_and_overwrite_replaces_it(tmp_path: Path, capsys) -> None:
    from inilora_hf import inilora_init
    from inilora_hf.cli.demo import build_demo_base

    base = build_demo_base(tmp_path / "base")
    out = tmp_path / "fs"
    inilora_init(base, variant="pissa", rank=4, cache_dir=tmp_path / "cache").prepare().save_pretrained(out)
    before = snapshot(out)
    capsys.readouterr()
    argv = ["compute", str(base), "--out", str(out), "--variant", "milora", "--rank", "4", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"inilora-hf compute: error: {out} already holds a factor set") and "--overwrite" in err
    assert len(err.splitlines()) == 1
    assert snapshot(out) == before
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads((out / "inilora_factors.json").read_text())["config"]["variant"] == "milora"


def test_convert_checks_every_output_before_writing_any(tmp_path: Path, capsys) -> None:
    from inilora_hf import inilora_init
    from inilora_hf.cli.demo import build_demo_base

    base = build_demo_base(tmp_path / "base")
    model = inilora_init(base, variant="inilora-beta", rank=4, cache_dir=tmp_path / "cache")()
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text("{}")
    capsys.readouterr()
    argv = ["convert", str(tmp_path / "ckpt"), "--merged", str(tmp_path / "merged"), "--lora", str(tmp_path / "lora")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'lora'} already exists" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "merged").exists()  # refused before the merged checkpoint was written
    assert main([*argv, "--overwrite"]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_output_folder_of_a_failed_job_is_removed_and_a_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="job failed"), replacing_output_dir(tmp_path / "new") as folder:
        (folder / "partial.bin").write_bytes(b"half")
        raise RuntimeError("job failed")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutputExistsError, match="is not a folder"):
        check_output_dir(tmp_path / "a-file", overwrite=True)
    assert (tmp_path / "a-file").read_text() == "x"


# ------------------------------------------------------------------------------------------ Ctrl-C


def test_ctrl_c_exits_130_with_one_line_and_keeps_the_previous_folder(tmp_path: Path) -> None:
    """A real SIGINT to the console script in the middle of `demo --overwrite`: exit 130, one line, no traceback,
    and the folder it was replacing is back as it was."""
    work = tmp_path / "work"
    out = work / "demo"
    out.mkdir(parents=True)
    (out / "previous-run.txt").write_text("keep me")
    argv = [
        console_script(),
        "demo",
        "--output-dir",
        str(out),
        "--overwrite",
        "--steps",
        "100000000",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    # A child inherits an *ignored* SIGINT (shells start background jobs that way) but not a handler: with a
    # handler installed here, the child starts with the default disposition, as under an interactive terminal.
    previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    with open(tmp_path / "stderr.txt", "w+") as stderr:
        try:
            process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr)
        finally:
            signal.signal(signal.SIGINT, previous_handler)
        try:
            deadline = time.monotonic() + 240
            while not (out / "base" / "model.safetensors").is_file():  # the new run is under way (fit: 1e8 steps)
                assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()
                time.sleep(0.2)
            time.sleep(1.0)
            process.send_signal(signal.SIGINT)
            process.wait(timeout=120)
        finally:
            process.kill()
    err = (tmp_path / "stderr.txt").read_text()
    assert process.returncode == INTERRUPTED_EXIT_CODE, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.rstrip("\n").splitlines()[-1] == "inilora-hf demo: interrupted" and err.count("interrupted") == 1
    assert snapshot(out) == {"previous-run.txt": b"keep me"}
    assert [p.name for p in work.iterdir()] == ["demo"]


# ------------------------------------------------------------------------------------------ inspect


def test_inspect_shows_a_dash_where_a_variant_has_no_fit_statistics(tmp_path: Path, capsys) -> None:
    from inilora_hf import inilora_init
    from inilora_hf.cli.demo import build_demo_base

    base = build_demo_base(tmp_path / "base")
    inilora_init(base, variant="inilora-beta", rank=4, cache_dir=tmp_path / "cache").prepare().save_pretrained(
        tmp_path / "fs"
    )
    assert main(["inspect", str(tmp_path / "fs")]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out
    rows = [line.split() for line in out.splitlines() if line.startswith("model.layers.")]
    assert len(rows) == 4 and all(row[2:] == ["—", "—", "—"] for row in rows), out
    assert "inilora-beta does not fit s·B·A to W0" in out


# ------------------------------------------------------------------------------------------ repository


def test_default_output_folders_of_the_demo_and_examples_are_git_ignored() -> None:
    ignored = set((REPO_ROOT / ".gitignore").read_text().split())
    folders = {build_parser().parse_args(["demo"]).output_dir}
    for example in sorted((REPO_ROOT / "examples").glob("*.py")):
        for node in ast.walk(ast.parse(example.read_text())):
            if isinstance(node, ast.Call) and node.args and getattr(node.args[0], "value", None) == "--output-dir":
                folders |= {kw.value.value for kw in node.keywords if kw.arg == "default"}
    assert len(folders) == 4, folders
    assert {f"/{folder}/" for folder in folders} <= ignored


def test_license_is_the_apache_2_text_and_declared_for_the_wheel() -> None:
    """LICENSE is the Apache License 2.0 verbatim (apache.org's LICENSE-2.0.txt), declared as the license file of the
    distribution (setuptools then ships it in the wheel's .dist-info/licenses/)."""
    text = (REPO_ROOT / "LICENSE").read_bytes()
    assert hashlib.sha256(text).hexdigest() == APACHE_2_SHA256
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert re.search(r'^license = "Apache-2.0"$', pyproject, re.MULTILINE)
    assert re.search(r'^license-files = \["LICENSE"\]$', pyproject, re.MULTILINE)


# ------------------------------------------------------------------------------------------ demo variants


def test_demo_runs_the_data_driven_variant_it_lists(tmp_path: Path) -> None:
    """`--help` lists lora-sb for the demo: it runs (its factor set computed by SFTTrainer from the demo data), and
    its two exports agree: the merged checkpoint and the plain PEFT adapter on the original base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "demo"
    argv = [
        "demo",
        "--output-dir",
        str(out),
        "--variant",
        "lora-sb",
        "--train-steps",
        "1",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert main(argv) == 0
    ids = torch.randint(4, 20, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
        adapter = PeftModel.from_pretrained(base, out / "lora")(input_ids=ids).logits
    assert json.loads((out / "factors" / "inilora_factors.json").read_text())["config"]["variant"] == "lora-sb"
    # Same math in a different fp32 order (W0 + s·B·R·A summed once vs. two matmuls per layer): a few hundred
    # roundings of relative size eps per logit at most.
    assert (merged - adapter).abs().max() <= 1000 * torch.finfo(torch.float32).eps * merged.abs().max()


def test_an_error_of_a_command_that_loads_the_heavy_layers_is_one_line(tmp_path):
    """In a fresh process (so torch, peft and bitsandbytes are imported for the first time): stderr holds exactly
    the error line, not third-party import notices."""
    result = subprocess.run(
        [sys.executable, "-m", "inilora_hf.cli", "inspect", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("inilora-hf inspect: error:")
