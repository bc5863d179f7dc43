"""FactorSet files and the local cache as used by inilora_init: round trips, hits, misses, bad files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from inilora_hf import (
    FactorSet,
    FactorSetCorruptError,
    FactorSetFormatError,
    FactorSetMismatchError,
    inilora_init,
)
from tests.conftest import tiny_llama

INPUT_IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))


@pytest.fixture
def factor_set() -> FactorSet:
    return inilora_init(tiny_llama(), variant="inilora", steps=50).prepare()


def test_save_load_round_trip_is_bit_exact(tmp_path, factor_set) -> None:
    factor_set.save_pretrained(tmp_path / "fs")
    loaded = FactorSet.from_pretrained(tmp_path / "fs")
    assert sorted(loaded.factors) == sorted(factor_set.factors)
    for name, module in factor_set.factors.items():
        assert torch.equal(loaded.factors[name].lora_A, module.lora_A)
        assert torch.equal(loaded.factors[name].lora_B, module.lora_B)
    assert loaded.config == factor_set.config
    assert loaded.fingerprints == factor_set.fingerprints and loaded.stats == factor_set.stats
    assert loaded.info == factor_set.info
    # Plain safetensors: readable without inilora_hf.
    with safe_open(tmp_path / "fs" / "factors.safetensors", framework="pt") as handle:
        keys = set(handle.keys())
        assert "model.layers.0.self_attn.q_proj.lora_A" in keys and len(keys) == 8


def test_sharded_save_writes_an_index_and_loads(tmp_path, factor_set) -> None:
    factor_set.save_pretrained(tmp_path / "fs", max_shard_size=3000)
    files = sorted(p.name for p in (tmp_path / "fs").iterdir())
    assert "factors.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    loaded = FactorSet.from_pretrained(tmp_path / "fs")
    assert torch.equal(
        loaded.factors["model.layers.1.self_attn.v_proj"].lora_B,
        factor_set.factors["model.layers.1.self_attn.v_proj"].lora_B,
    )


def test_second_init_hits_the_cache_and_changes_miss(isolated_factor_cache) -> None:
    base = tiny_llama()
    first = inilora_init(base, variant="inilora", steps=50)
    first_model = first()
    assert first.factor_source == "computed"
    second = inilora_init(base, variant="inilora", steps=50)
    second_model = second()
    assert second.factor_source.startswith("cache:")
    for name, module in first.factor_set.factors.items():
        assert torch.equal(second.factor_set.factors[name].lora_A, module.lora_A)
    with torch.no_grad():
        assert torch.equal(first_model(INPUT_IDS).logits, second_model(INPUT_IDS).logits)
    changed_option = inilora_init(base, variant="inilora", steps=51)
    changed_option.prepare()
    assert changed_option.factor_source == "computed"
    other_base = tiny_llama(seed=1)
    changed_base = inilora_init(other_base, variant="inilora", steps=50)
    changed_base.prepare()
    assert changed_base.factor_source == "computed"
    assert len([p for p in isolated_factor_cache.iterdir() if p.is_dir()]) == 3


def test_corrupted_cache_entry_is_recomputed(isolated_factor_cache, caplog) -> None:
    base = tiny_llama()
    inilora_init(base, variant="pissa").prepare()
    entry = next(p for p in isolated_factor_cache.iterdir() if p.is_dir())
    data = bytearray((entry / "factors.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (entry / "factors.safetensors").write_bytes(bytes(data))
    again = inilora_init(base, variant="pissa")
    again.prepare()
    assert again.factor_source == "computed"


def test_given_factor_set_is_applied_and_checked(tmp_path, factor_set) -> None:
    factor_set.save_pretrained(tmp_path / "fs")
    base = tiny_llama()
    computed = inilora_init(base, variant="inilora", steps=50)()
    loaded = inilora_init(base, factors=tmp_path / "fs")()
    with torch.no_grad():
        assert torch.equal(computed(INPUT_IDS).logits, loaded(INPUT_IDS).logits)
    # The same checkpoint loaded in bf16 still matches its fp32 factor set (up to dtype rounding).
    assert inilora_init(tiny_llama().to(torch.bfloat16), factors=tmp_path / "fs")() is not None


def test_factor_set_for_another_model_is_refused(tmp_path, factor_set) -> None:
    factor_set.save_pretrained(tmp_path / "fs")
    with pytest.raises(
        FactorSetMismatchError,
        match=r"Module 'model\.layers\.0\.self_attn\.q_proj' of this model has different weights",
    ):
        inilora_init(tiny_llama(seed=7), factors=tmp_path / "fs")()
    with pytest.raises(FactorSetMismatchError, match=r"has shape \(96, 96\) but the factor set expects \(64, 64\)"):
        inilora_init(tiny_llama(hidden_size=96, intermediate_size=192), factors=tmp_path / "fs")()
    # strict=False applies it anyway when shapes fit.
    assert inilora_init(tiny_llama(seed=7), factors=tmp_path / "fs", strict=False)() is not None
    with pytest.raises(ValueError, match="computed with rank=8, but inilora_init was called with rank=4"):
        inilora_init(tiny_llama(), factors=tmp_path / "fs", rank=4)()


def test_truncated_missing_and_newer_files_are_reported(tmp_path, factor_set) -> None:
    directory = factor_set.save_pretrained(tmp_path / "fs")
    weights = directory / "factors.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[: len(original) // 2])
    with pytest.raises(FactorSetCorruptError, match="factors.safetensors does not match the checksum"):
        FactorSet.from_pretrained(directory)
    weights.unlink()
    with pytest.raises(FactorSetCorruptError, match="factors.safetensors is missing"):
        FactorSet.from_pretrained(directory)
    weights.write_bytes(original)
    metadata = json.loads((directory / "inilora_factors.json").read_text())
    metadata["format_version"] = 2
    (directory / "inilora_factors.json").write_text(json.dumps(metadata))
    with pytest.raises(FactorSetFormatError, match="format version 2.*Upgrade"):
        FactorSet.from_pretrained(directory)
    (directory / "inilora_factors.json").unlink()
    with pytest.raises(FactorSetCorruptError, match="No inilora_factors.json"):
        FactorSet.from_pretrained(directory)
