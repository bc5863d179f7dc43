"""A factor set computed by 2 `torchrun` ranks on CPU (gloo): the split, bit-identity with one process (command
line and `inilora_init`), calibration gradients summed across ranks, a rank dying mid-compute, and ranks that
disagree on the config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from inilora_hf import inilora_init
from inilora_hf.factorsets.compute import run_variant
from inilora_hf.factorsets.distributed import PER_MODULE_VARIANTS, pooled_stds, split_modules
from inilora_hf.factorsets.factor_set import FactorSet
from inilora_hf.factorsets.streaming import compute_streamed
from inilora_hf.variants.approximation import mean_by_type
from inilora_hf.variants.config import InitConfig
from tests.conftest import tiny_llama
from tests.dist_compute_worker import CALIBRATION_BATCH, INILORA_STEPS, calibration_rows
from tests.helpers import FP32_UNIT_ROUNDOFF, REPO_ROOT, torchrun, torchrun_env
from tests.test_conv1d import TARGETS as GPT2_TARGETS
from tests.test_conv1d import tiny_gpt2

WORKER = str(REPO_ROOT / "tests" / "dist_compute_worker.py")


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")) if cache.exists() else []


def _assert_bit_identical(actual: FactorSet, expected: FactorSet) -> None:
    assert sorted(actual.factors) == sorted(expected.factors)
    for name, factors in expected.factors.items():
        assert torch.equal(actual.factors[name].lora_A, factors.lora_A), name
        assert torch.equal(actual.factors[name].lora_B, factors.lora_B), name
    assert actual.stats == expected.stats
    assert actual.fingerprints == expected.fingerprints


def _assert_split(info: dict, modules: list[str]) -> None:
    assert info["world_size"] == 2
    shares = [share["modules"] for share in info["ranks"]]
    assert all(shares) and sorted(shares[0] + shares[1]) == sorted(modules), f"a split of the modules: {shares}"
    assert all(share["seconds"] > 0 for share in info["ranks"])


def test_split_balances_by_size_and_is_deterministic() -> None:
    costs = {"big": 64 * 64, "mid.a": 32 * 64, "mid.b": 32 * 64, "small": 16 * 16}
    assert split_modules(costs, 2) == [["big", "small"], ["mid.a", "mid.b"]]
    assert split_modules(costs, 3) == [["big"], ["mid.a", "small"], ["mid.b"]]
    assert split_modules(costs, 5)[4] == [], "more ranks than modules: the last ones idle"


@pytest.mark.parametrize("variant", sorted(PER_MODULE_VARIANTS))
def test_per_module_variants_do_not_depend_on_the_split(variant: str) -> None:
    """What `PER_MODULE_VARIANTS` promises: each half of the modules, computed alone with the whole model's σ̄,
    gives exactly the factors of the whole computation."""
    model = tiny_llama()
    weights = {n: m.weight.detach().float() for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))}
    options = {"steps": 50} if variant == "inilora" else {"eta": 1e-3} if variant == "lora-sb" else {}
    config = InitConfig(variant, rank=4, lora_alpha=8, options=options)
    generator = torch.Generator().manual_seed(2)
    gradients = {n: torch.randn(w.shape, generator=generator) for n, w in weights.items()}
    cpu = torch.device("cpu")
    whole = run_variant(weights, config, device=cpu, gradients=gradients)
    std_by_type = mean_by_type(pooled_stds(weights, config))
    for share in split_modules({name: weight.numel() for name, weight in weights.items()}, 2):
        part = run_variant(
            {n: weights[n] for n in share}, config, device=cpu, gradients=gradients, std_by_type=std_by_type
        )
        for name in share:
            assert torch.equal(part[name].lora_A, whole[name].lora_A), name
            assert torch.equal(part[name].lora_B, whole[name].lora_B), name
            assert part[name].extra.keys() == whole[name].extra.keys()
            for key, value in whole[name].extra.items():
                assert torch.equal(part[name].extra[key], value), (name, key)


def test_cli_compute_on_two_ranks_is_bit_identical_to_one_process(tiny_base_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "factors"
    result = torchrun(
        "--module", "inilora_hf.cli", "compute", str(tiny_base_dir), "--out", str(out), "--variant", "inilora",
        "-o", f"steps={INILORA_STEPS}", "--device", "cpu", env=torchrun_env(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:]
    assert result.stdout.count(f"wrote 4 modules to {out} (2 ranks)") == 1, "rank 0 alone writes and reports"

    expected = compute_streamed(
        tiny_base_dir, InitConfig("inilora", options={"steps": INILORA_STEPS}), tmp_path / "one", device="cpu"
    )
    actual = FactorSet.from_pretrained(out)
    _assert_bit_identical(actual, expected)
    assert actual.model_key == expected.model_key and actual.config == expected.config
    _assert_split(actual.info["distributed"], sorted(expected.factors))


def test_cli_compute_on_two_ranks_reads_conv1d_layers_like_one_process(tmp_path: Path) -> None:
    """GPT-2 stores Conv1D weights `in × out`: each rank fits the `out × in` view and records the layout."""
    base = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(base)
    out = tmp_path / "factors"
    result = torchrun(
        "--module", "inilora_hf.cli", "compute", str(base), "--out", str(out), "--variant", "inilora",
        "--targets", ",".join(GPT2_TARGETS), "-o", f"steps={INILORA_STEPS}", "--device", "cpu",
        env=torchrun_env(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:]

    config = InitConfig("inilora", target_modules=tuple(GPT2_TARGETS), options={"steps": INILORA_STEPS})
    expected = compute_streamed(base, config, tmp_path / "one", device="cpu")
    actual = FactorSet.from_pretrained(out)
    _assert_bit_identical(actual, expected)
    assert actual.model_key == expected.model_key
    assert {fp.get("layout") for fp in actual.fingerprints.values()} == {"conv1d"}


def test_rank_death_leaves_no_entry_and_a_rerun_equals_one_process(tiny_base_dir: Path, tmp_path: Path) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    out.mkdir()
    died = torchrun(WORKER, "die", str(tiny_base_dir), str(out), str(cache), env=torchrun_env(tmp_path))
    assert died.returncode != 0, died.stdout[-6000:]
    assert _entries(cache) == [], "no factor set may appear in the cache after a rank died"

    rerun = torchrun(WORKER, "compute", str(tiny_base_dir), str(out), str(cache), env=torchrun_env(tmp_path))
    assert rerun.returncode == 0, rerun.stdout[-6000:]
    ranks = [json.loads((out / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert [r.get("error") for r in ranks] == [None, None]
    entries = _entries(cache)
    assert len(entries) == 2, f"one entry per factor set (inilora, lora-sb), written once: {entries}"
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".tmp-")], "the rerun cleans the dead run's files"

    for kind in ("inilora", "lora_sb"):
        assert ranks[0][kind] == ranks[1][kind], f"{kind}: every rank ends with the same factor set"
        assert ranks[0][kind]["source"] == "computed"
    key = next(entry.name for entry in entries if entry.name.startswith("inilora-"))
    for record in ranks:  # the second init of the same config: a cache hit on every rank
        assert record["inilora_again"]["source"] == f"cache:{key}"
        assert record["inilora_again"]["factors"] == record["inilora"]["factors"]
    expected = inilora_init(tiny_base_dir, variant="inilora", steps=INILORA_STEPS, use_cache=False).prepare()
    [entry] = [e for e in entries if e.name.startswith("inilora-")]
    actual = FactorSet.from_pretrained(entry)
    _assert_bit_identical(actual, expected)
    _assert_split(actual.info["distributed"], sorted(expected.factors))
    _assert_split(ranks[0]["lora_sb"]["distributed"], sorted(expected.factors))

    # Calibration gradients: each rank summed 2 of the 4 batches, then all-reduce; against plain autograd here.
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).train()
    rows = calibration_rows()
    per_batch = []
    for start in range(0, len(rows), CALIBRATION_BATCH):
        batch = {key: torch.tensor([row[key] for row in rows[start : start + CALIBRATION_BATCH]]) for key in rows[0]}
        model.zero_grad()
        (model(**batch).loss / CALIBRATION_BATCH).backward()
        per_batch.append({name: model.get_parameter(f"{name}.weight").grad.clone() for name in expected.factors})
    gradients = torch.load(out / "gradients.pt")
    for name in expected.factors:
        reference = sum(g[name].double() for g in per_batch)
        magnitude = sum(g[name].double().abs() for g in per_batch)
        # Either side adds the 4 fp32 batch gradients with at most 3 roundings, in another order.
        tolerance = 2 * 3 * FP32_UNIT_ROUNDOFF * magnitude
        assert ((gradients[name].double() - reference).abs() <= tolerance).all(), name


def test_ranks_that_disagree_on_the_config_fail_fast(tiny_base_dir: Path, tmp_path: Path) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    out.mkdir()
    result = torchrun(WORKER, "disagree", str(tiny_base_dir), str(out), str(cache), env=torchrun_env(tmp_path))
    assert result.returncode != 0
    ranks = [json.loads((out / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    for record in ranks:
        assert record["error"]["type"] == "RankMismatchError", record
        assert (
            "disagree on the config: rank 0 has lora_alpha=8, rank=8, rank 1 has lora_alpha=4, rank=4."
            in record["error"]["message"]
        )
        assert record["seconds"] < 30, "failed at the first exchange, not at the 60 s collective timeout"
    assert _entries(cache) == []
