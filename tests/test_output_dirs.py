"""`staged_output_dir`: the folder holds the old content or the complete new one, never a part or nothing."""

from __future__ import annotations

import os

import pytest

from inilora_hf import output_dirs
from inilora_hf.errors import OutputExistsError
from inilora_hf.output_dirs import staged_output_dir


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_text() for p in folder.rglob("*") if p.is_file()}


def test_replacement_happens_only_when_the_new_folder_is_complete(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="overwrite=True"), staged_output_dir(target):
        pass
    with pytest.raises(RuntimeError), staged_output_dir(target, overwrite=True) as staged:
        (staged / "new.txt").write_text("half")
        raise RuntimeError("job failed")
    assert _tree(target) == {"old.txt": "old"}
    with staged_output_dir(target, overwrite=True) as staged:
        (staged / "new.txt").write_text("new")
    assert _tree(target) == {"new.txt": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staged or old sibling left


def test_a_failure_between_the_two_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old folder is already aside; the new one fails to move in
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(output_dirs.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"), staged_output_dir(target, overwrite=True) as staged:
        (staged / "new.txt").write_text("new")
    assert _tree(target) == {"old.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
