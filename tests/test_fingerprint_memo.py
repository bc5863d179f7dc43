"""Remembered fingerprints: a cache hit on unchanged checkpoint files hashes no weight; anything else does."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from inilora_hf import inilora_init
from inilora_hf.factorsets import fingerprint_memo
from inilora_hf.factorsets.checkpoint_files import cached_checkpoint_dir
from inilora_hf.factorsets.fingerprint_memo import MEMO_DIR, checkpoint_identity
from inilora_hf.training import loading
from tests.conftest import tiny_llama

TARGETS = [f"model.layers.{layer}.self_attn.{proj}" for layer in range(2) for proj in ("q_proj", "v_proj")]
INPUT_IDS = torch.arange(4, 20).reshape(2, 8)


def _saved_llama(directory: Path, seed: int) -> Path:
    tiny_llama(seed).save_pretrained(directory)
    return directory


def _hashed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Record the shape of every weight that gets fully hashed from now on."""
    calls: list[tuple[int, ...]] = []
    original = fingerprint_memo.weight_fingerprint

    def counting(weight: torch.Tensor, **kwargs: Any) -> dict:
        calls.append(tuple(weight.shape))
        return original(weight, **kwargs)

    monkeypatch.setattr(fingerprint_memo, "weight_fingerprint", counting)
    return calls


def _init(model: str | Path):
    return inilora_init(model, variant="inilora", solver="svd")


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def _memo_files(cache: Path) -> list[Path]:
    return sorted((cache / MEMO_DIR).glob("*.json"))


def test_cache_hit_on_unchanged_files_hashes_no_weight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_factor_cache: Path
) -> None:
    base = _saved_llama(tmp_path / "base", seed=0)
    first = _init(base)()
    calls = _hashed(monkeypatch)
    second_init = _init(base)
    second = second_init()

    assert calls == [], "nothing is hashed when the checkpoint files are unchanged"
    assert second_init.factor_source.startswith("cache:")
    assert torch.equal(_logits(first), _logits(second))
    # The remembered sha256 values are those of the loaded weights' bytes, computed here independently.
    loaded = AutoModelForCausalLM.from_pretrained(base)
    (memo,) = _memo_files(isolated_factor_cache)
    records = json.loads(memo.read_text())["modules"]
    assert sorted(records) == sorted(f"{name}|float32" for name in TARGETS)
    for name in TARGETS:
        expected = hashlib.sha256(loaded.get_submodule(name).weight.detach().numpy().tobytes()).hexdigest()
        assert records[f"{name}|float32"]["fingerprint"]["sha256"] == expected


def test_rewritten_checkpoint_is_hashed_again_and_recomputed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = _saved_llama(tmp_path / "base", seed=0)
    _init(base)()
    _saved_llama(base, seed=1)  # same file names and sizes, other weights
    calls = _hashed(monkeypatch)
    init = _init(base)
    model = init()

    assert sorted(calls) == sorted([(64, 64), (32, 64)] * 2), "every target weight is hashed again"
    assert init.factor_source == "computed", "the new weights are a cache miss, not the old entry"
    # The residual init reproduces the *new* base model exactly (R + s·B·A = W0).
    new_base = AutoModelForCausalLM.from_pretrained(base)
    assert torch.allclose(_logits(model), _logits(new_base), rtol=0, atol=1e-4)


def test_spot_check_rejects_a_memo_recorded_for_other_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two checkpoints whose file identities collide (forced here) still get their own fingerprints."""
    colliding = {"files": [["/same/file", 1, 1, 1, 1]], "transformers": "x"}
    monkeypatch.setattr(loading, "checkpoint_identity", lambda *args, **kwargs: dict(colliding))
    _init(_saved_llama(tmp_path / "a", seed=0))()
    calls = _hashed(monkeypatch)
    other_init = _init(_saved_llama(tmp_path / "b", seed=1))
    other = other_init()

    assert len(calls) == len(TARGETS)
    assert other_init.factor_source == "computed"
    assert torch.allclose(_logits(other), _logits(tiny_llama(1)), rtol=0, atol=1e-4)


def test_unreadable_memo_is_reported_and_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, isolated_factor_cache: Path
) -> None:
    base = _saved_llama(tmp_path / "base", seed=0)
    _init(base)()
    (memo,) = _memo_files(isolated_factor_cache)
    memo.write_text('{"format": 1, "modu')  # a torn write
    init = _init(base)
    with caplog.at_level(logging.WARNING, logger="inilora_hf"):
        init()

    assert "unreadable fingerprint memo" in caplog.text and str(memo) in caplog.text
    assert init.factor_source.startswith("cache:"), "the weights were hashed again and hit the same entry"
    assert len(json.loads(memo.read_text())["modules"]) == len(TARGETS)
    assert not list((isolated_factor_cache / MEMO_DIR).glob(".tmp-*")), "no temp file is left behind"


def test_identity_covers_the_weight_files_and_changes_when_touched(tmp_path: Path) -> None:
    base = _saved_llama(tmp_path / "base", seed=0)
    weights = (base / "model.safetensors").resolve()
    identity = checkpoint_identity(base)
    status = weights.stat()
    assert identity["files"] == [[str(weights), status.st_size, status.st_ino, status.st_mtime_ns, status.st_ctime_ns]]

    time.sleep(0.05)
    os.utime(weights, ns=(status.st_atime_ns, status.st_mtime_ns))  # same mtime, but the ctime moves
    assert checkpoint_identity(base) != identity


def test_loads_that_could_change_the_weights_are_never_remembered(tmp_path: Path, tiny_base_dir: Path) -> None:
    assert checkpoint_identity(tiny_llama()) is None, "a loaded model has no files"
    assert checkpoint_identity(tiny_base_dir, model_kwargs={"subfolder": "other"}) is None
    assert checkpoint_identity(tiny_base_dir, model_kwargs={"use_safetensors": False}) is None
    (tmp_path / "no-weights").mkdir()
    assert checkpoint_identity(tmp_path / "no-weights") is None
    assert checkpoint_identity("org/never-downloaded") is None
    assert checkpoint_identity(tiny_base_dir, model_kwargs={"dtype": torch.bfloat16}) is not None


def test_loaded_model_and_use_cache_false_always_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_factor_cache: Path
) -> None:
    base = _saved_llama(tmp_path / "base", seed=0)
    _init(base)()
    calls = _hashed(monkeypatch)
    inilora_init(AutoModelForCausalLM.from_pretrained(base), variant="inilora", solver="svd")()
    assert len(calls) == len(TARGETS)
    inilora_init(base, variant="inilora", solver="svd", use_cache=False)()
    assert len(calls) == 2 * len(TARGETS)


def test_bf16_load_gets_its_own_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_factor_cache: Path
) -> None:
    base = _saved_llama(tmp_path / "base", seed=0)
    _init(base)()
    calls = _hashed(monkeypatch)
    inilora_init(base, variant="inilora", solver="svd", dtype=torch.bfloat16)()
    assert len(calls) == len(TARGETS), "bf16 weights have other bytes: hashed once"
    inilora_init(base, variant="inilora", solver="svd", dtype=torch.bfloat16)()
    assert len(calls) == len(TARGETS), "and remembered next to the fp32 records"
    (memo,) = _memo_files(isolated_factor_cache)
    assert len(json.loads(memo.read_text())["modules"]) == 2 * len(TARGETS)


def test_hub_model_fingerprints_are_remembered(hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = "org/tiny-llama-memo"
    hub.api.create_repo(repo)
    hub.api.upload_folder(repo_id=repo, folder_path=_saved_llama(tmp_path / "base", seed=0))
    _init(repo)()
    snapshot = cached_checkpoint_dir(repo)
    assert snapshot is not None and snapshot.is_relative_to(hub.cache_dir) and (snapshot / "model.safetensors").exists()

    calls = _hashed(monkeypatch)
    init = _init(repo)
    init()
    assert calls == [] and init.factor_source.startswith("cache:")


def test_identity_follows_the_revision_from_pretrained_uses(hub, tmp_path: Path) -> None:
    """`model_kwargs["revision"]` wins over `revision=`, exactly as in the load (`kwargs.setdefault`)."""
    from huggingface_hub import snapshot_download

    repo = "org/tiny-llama-revisions"
    hub.api.create_repo(repo)
    old = hub.api.upload_folder(repo_id=repo, folder_path=_saved_llama(tmp_path / "a", seed=0)).oid
    hub.api.upload_folder(repo_id=repo, folder_path=_saved_llama(tmp_path / "b", seed=1))
    old_dir, new_dir = Path(snapshot_download(repo, revision=old)), Path(snapshot_download(repo))
    identity = checkpoint_identity(repo, revision="main", model_kwargs={"revision": old})
    assert [entry[0] for entry in identity["files"]] == [str((old_dir / "model.safetensors").resolve())]
    assert (old_dir / "model.safetensors").resolve() != (new_dir / "model.safetensors").resolve()
