"""Streamed `compute` on a sharded checkpoint: equal to the in-memory path, resumable, and clear about bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel

from inilora_hf import FactorSet, InitConfig, TargetModuleError, inilora_init
from inilora_hf.errors import FactorSetMismatchError
from inilora_hf.factorsets.compute import run_variant
from inilora_hf.factorsets.streaming import compute_streamed, parse_memory
from inilora_hf.variants import registry
from tests.conftest import tiny_llama
from tests.helpers import (
    adam_drift_bound,
    factor_mse_rounding,
    fp32_gamma,
    fp32_logits_tolerance,
    svd_backward_error,
    svd_factor_tolerance,
)

OPTIONS = {"inilora": {"steps": 200}, "inilora-alpha": {}, "pissa": {}}
RANK = 4
TARGETS = ["q_proj", "v_proj"]
INPUT_IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama saved in ~25 safetensors shards of at most 50 KB."""
    directory = tmp_path_factory.mktemp("sharded-llama")
    tiny_llama(seed=1).save_pretrained(directory, max_shard_size="50KB")
    assert (directory / "model.safetensors.index.json").is_file()
    return directory


def _config(variant: str, **overrides) -> InitConfig:
    return InitConfig(variant, rank=RANK, target_modules=TARGETS, options={**OPTIONS[variant], **overrides})


def _in_memory(base: Path, variant: str, **kwargs) -> FactorSet:
    return inilora_init(
        base,
        variant=variant,
        rank=RANK,
        target_modules=TARGETS,
        use_cache=False,
        device="cpu",
        **OPTIONS[variant],
        **kwargs,
    ).prepare()


def _grouping_tolerance(variant: str, base: torch.nn.Module) -> dict[str, float]:
    """Per target module, how far factors computed in differently grouped stacks may differ: the same operations per
    matrix, so only a BLAS/LAPACK that blocks a batch differently may round differently. inilora: the Adam drift
    bound; pissa: the fp32 SVD factor bound (of W0 / s); inilora-alpha: none (seeded draws, no arithmetic)."""
    tolerances = {}
    for name, module in base.named_modules():
        if name.rsplit(".", 1)[-1] not in TARGETS:
            continue
        weight = module.weight.detach().double().numpy()
        if variant == "inilora":
            tolerances[name] = adam_drift_bound(
                OPTIONS[variant]["steps"], 5e-4, accumulation=max(weight.shape) + RANK + 3
            )
        elif variant == "pissa":
            singular = np.linalg.svd(weight / _config(variant).scaling, compute_uv=False)
            tolerances[name] = svd_factor_tolerance(singular, weight.shape, RANK)
        else:
            tolerances[name] = 0.0
    return tolerances


def _assert_same_factors(actual: FactorSet, expected: FactorSet, atol: dict[str, float] | None = None) -> None:
    assert sorted(actual.factors) == sorted(expected.factors)
    for name, factors in expected.factors.items():
        tolerance = atol[name] if atol else 0.0
        torch.testing.assert_close(actual.factors[name].lora_A, factors.lora_A, atol=tolerance, rtol=0, msg=name)
        torch.testing.assert_close(actual.factors[name].lora_B, factors.lora_B, atol=tolerance, rtol=0, msg=name)


def _assert_same_stats(actual: FactorSet, expected: FactorSet, base: torch.nn.Module, atol: dict[str, float]) -> None:
    """`mse`, `optimal_mse` and `mse_ratio` agree as far as factors `atol[name]` apart and fp32 rounding allow: factors
    τ apart move s·B·A by δ ≤ s·(τ·(Σ|A| + Σ|B|) + r·τ²) per entry, the MSE by δ·(2·RMSE + δ); each factor_mse rounds
    (`factor_mse_rounding`); each σ_i of the optimum is within E of the exact one (Weyl)."""
    assert sorted(actual.stats) == sorted(expected.stats)
    scaling = expected.config.scaling
    for name, row in expected.stats.items():
        factors, tau = expected.factors[name], atol[name]
        weight = base.get_submodule(name).weight.detach().double()
        B, A = scaling * factors.lora_B.double(), factors.lora_A.double()
        delta = (
            scaling * tau * (A.abs().sum(0).max().item() + B.abs().sum(1).max().item() / scaling)
            + scaling * RANK * tau**2
        )
        rounding = factor_mse_rounding(weight[None], B[None], A[None]).item()
        mse_tolerance = delta * (2 * math.sqrt(row["mse"]) + delta) + 2 * rounding
        singular = np.linalg.svd(weight.numpy(), compute_uv=False)
        error = svd_backward_error(singular, tuple(weight.shape))
        optimal_tolerance = ((2 * singular[RANK:] + 2 * error) * 2 * error).sum() / weight.numel()
        optimal_tolerance += 2 * fp32_gamma(1) * row["optimal_mse"]  # each stored as fp32
        ratio_tolerance = row["mse_ratio"] * (mse_tolerance / row["mse"] + optimal_tolerance / row["optimal_mse"])
        assert actual.stats[name]["mse"] == pytest.approx(row["mse"], rel=0, abs=mse_tolerance), name
        assert actual.stats[name]["optimal_mse"] == pytest.approx(row["optimal_mse"], rel=0, abs=optimal_tolerance), (
            name
        )
        assert actual.stats[name]["mse_ratio"] == pytest.approx(row["mse_ratio"], rel=0, abs=ratio_tolerance), name


# ------------------------------------------------------------------------------------- equal to in memory


@pytest.mark.parametrize("variant", ["inilora", "inilora-alpha", "pissa"])
def test_streamed_equals_in_memory_init(sharded_base: Path, tmp_path: Path, variant: str) -> None:
    expected = _in_memory(sharded_base, variant)
    for max_memory, groups in ((None, 2), (1, 4)):  # one group per shape; one matrix per group
        out = tmp_path / f"out-{max_memory}"
        streamed = compute_streamed(sharded_base, _config(variant), out, max_memory=max_memory, device="cpu")
        assert streamed.info["streamed"]["groups"] == groups
        tolerance = _grouping_tolerance(variant, tiny_llama(seed=1))
        _assert_same_factors(streamed, expected, atol=tolerance)
        _assert_same_stats(streamed, expected, tiny_llama(seed=1), tolerance)
        assert streamed.fingerprints == expected.fingerprints
        assert streamed.model_key == expected.model_key
        assert streamed.config == expected.config
        assert streamed.base_model == str(sharded_base) and streamed.base_revision is None
        assert {"created_at", "compute_seconds", "compute_device", "versions"} <= set(streamed.info)
        _assert_same_factors(FactorSet.from_pretrained(out), streamed)


def test_bf16_checkpoint_is_fingerprinted_in_its_stored_dtype(tmp_path: Path) -> None:
    base = tmp_path / "bf16"
    tiny_llama(seed=2).to(torch.bfloat16).save_pretrained(base, max_shard_size="50KB")
    streamed = compute_streamed(base, _config("pissa"), tmp_path / "out", device="cpu")
    expected = _in_memory(base, "pissa", dtype=torch.bfloat16)
    assert {fp["dtype"] for fp in streamed.fingerprints.values()} == {"bfloat16"}
    assert streamed.fingerprints == expected.fingerprints
    _assert_same_factors(streamed, expected, atol=_grouping_tolerance("pissa", tiny_llama(seed=2).to(torch.bfloat16)))


def test_output_is_accepted_by_inilora_init_and_refused_for_another_base(sharded_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "factors"
    compute_streamed(sharded_base, _config("inilora"), out, device="cpu")
    loaded = FactorSet.from_pretrained(out)
    model = inilora_init(sharded_base, factors=out)()
    assert isinstance(model, PeftModel) and model.factor_set.model_key == loaded.model_key
    base = tiny_llama(seed=1)
    with torch.no_grad():  # a residual init leaves the outputs unchanged
        tolerance = fp32_logits_tolerance(base, INPUT_IDS, RANK)
        torch.testing.assert_close(model(INPUT_IDS).logits, base(INPUT_IDS).logits, rtol=0, atol=tolerance)

    other = tmp_path / "other-base"
    tiny_llama(seed=3).save_pretrained(other)
    with pytest.raises(FactorSetMismatchError, match="different weights"):
        inilora_init(other, factors=out)()


def test_existing_output_dir(sharded_base: Path, tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    out = root / "out"
    compute_streamed(sharded_base, _config("inilora-alpha"), out, device="cpu")
    replaced = compute_streamed(sharded_base, _config("inilora-alpha", seed=7), out, device="cpu", overwrite=True)
    assert FactorSet.from_pretrained(out).config.options["seed"] == 7 == replaced.config.options["seed"]
    assert [p.name for p in root.iterdir()] == ["out"], "no temporary directories are left behind"

    busy = root / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no factor set"):
        compute_streamed(sharded_base, _config("inilora-alpha"), busy, device="cpu")
    assert (busy / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------- resume


def _count_groups(monkeypatch: pytest.MonkeyPatch, *, interrupt_at: int | None = None) -> list[list[str]]:
    """Record the modules of every group the variant runs on; raise KeyboardInterrupt at group `interrupt_at`."""
    import inilora_hf.factorsets.streaming as streaming

    computed: list[list[str]] = []

    def counting(weights, *args, **kwargs):
        if len(computed) == interrupt_at:
            raise KeyboardInterrupt("simulated interruption")
        computed.append(sorted(weights))
        return run_variant(weights, *args, **kwargs)

    monkeypatch.setattr(streaming, "run_variant", counting)
    return computed


def test_interrupted_run_resumes_without_recomputing_finished_groups(
    sharded_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config("inilora", steps=50)
    work, out = tmp_path / "work", tmp_path / "out"
    computed = _count_groups(monkeypatch, interrupt_at=1)
    with pytest.raises(KeyboardInterrupt):
        compute_streamed(sharded_base, config, out, max_memory=1, device="cpu", work_dir=work)
    assert not out.exists()
    assert sorted(p.name for p in work.iterdir()) == ["group-00000"]
    first_group = computed[0]

    computed = _count_groups(monkeypatch)
    resumed = compute_streamed(sharded_base, config, out, max_memory=1, device="cpu", work_dir=work)
    assert len(computed) == 3 and first_group not in computed
    assert resumed.info["streamed"]["resumed_groups"] == 1
    assert not work.exists(), "the work dir is cleared after success"

    computed = _count_groups(monkeypatch)
    uninterrupted = compute_streamed(sharded_base, config, tmp_path / "fresh", max_memory=1, device="cpu")
    assert len(computed) == 4
    _assert_same_factors(resumed, uninterrupted)
    assert resumed.stats == uninterrupted.stats and resumed.fingerprints == uninterrupted.fingerprints
    assert FactorSet.from_pretrained(out).model_key == uninterrupted.model_key


def test_groups_of_other_settings_or_corrupt_are_recomputed(
    sharded_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    _count_groups(monkeypatch, interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):  # leaves groups 0 and 1 of seed 0
        compute_streamed(
            sharded_base, _config("inilora-alpha"), tmp_path / "a", max_memory=1, device="cpu", work_dir=work
        )
    corrupt = next((work / "group-00001").glob("factors*.safetensors"))
    corrupt.write_bytes(corrupt.read_bytes()[:-8])

    computed = _count_groups(monkeypatch)  # same settings: group 0 is reused, the truncated group 1 recomputed
    same = compute_streamed(
        sharded_base, _config("inilora-alpha"), tmp_path / "a", max_memory=1, device="cpu", work_dir=work
    )
    assert len(computed) == 3 and same.info["streamed"]["resumed_groups"] == 1

    _count_groups(monkeypatch, interrupt_at=1)
    with pytest.raises(KeyboardInterrupt):
        compute_streamed(
            sharded_base, _config("inilora-alpha"), tmp_path / "b", max_memory=1, device="cpu", work_dir=work
        )
    computed = _count_groups(monkeypatch)  # another seed: nothing of the seed-0 run is reused
    other = compute_streamed(
        sharded_base, _config("inilora-alpha", seed=1), tmp_path / "c", max_memory=1, device="cpu", work_dir=work
    )
    assert len(computed) == 4 and other.info["streamed"]["resumed_groups"] == 0
    expected = _in_memory(sharded_base, "inilora-alpha", seed=1)
    _assert_same_factors(other, expected)


# -------------------------------------------------------------------------------------------------- Hub


def test_hub_base_downloads_only_config_and_safetensors_and_records_the_commit(
    hub, sharded_base: Path, tmp_path: Path
) -> None:
    hub.api.create_repo("org/sharded-llama")
    (extra := tmp_path / "pytorch_model.bin").write_bytes(b"not needed")
    hub.api.upload_folder(repo_id="org/sharded-llama", folder_path=sharded_base)
    commit = hub.api.upload_file(repo_id="org/sharded-llama", path_or_fileobj=extra, path_in_repo=extra.name).oid

    streamed = compute_streamed("org/sharded-llama", _config("pissa"), tmp_path / "out", device="cpu")
    assert streamed.base_model == "org/sharded-llama" and streamed.base_revision == commit
    snapshot = next(hub.cache_dir.glob("models--org--sharded-llama/snapshots/*"))
    assert not (snapshot / "pytorch_model.bin").exists()
    assert streamed.model_key == _in_memory(sharded_base, "pissa").model_key


# ------------------------------------------------------------------------------------------- bad input


def test_target_that_is_not_linear(sharded_base: Path, tmp_path: Path) -> None:
    config = InitConfig("pissa", rank=RANK, target_modules=["embed_tokens"])
    with pytest.raises(TargetModuleError, match="'model.embed_tokens' is a Embedding, not a torch.nn.Linear"):
        compute_streamed(sharded_base, config, tmp_path / "out", device="cpu")
    with pytest.raises(TargetModuleError, match="matches no module"):
        compute_streamed(sharded_base, InitConfig("pissa", target_modules=["nope"]), tmp_path / "out")


def test_missing_shard_names_the_file(sharded_base: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(sharded_base, base)
    weight_map = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    shard = weight_map["model.layers.1.self_attn.v_proj.weight"]
    (base / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"Shard '{shard}' listed in .*index.json is missing"):
        compute_streamed(base, _config("pissa"), tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_checkpoint_without_safetensors_or_matching_tensors(sharded_base: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(sharded_base / "config.json", bare)
    with pytest.raises(FileNotFoundError, match="No model.safetensors or model.safetensors.index.json"):
        compute_streamed(bare, _config("pissa"), tmp_path / "out", device="cpu")

    wrong = tmp_path / "wrong"
    shutil.copytree(sharded_base, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 4}))  # v_proj would be 64×64
    with pytest.raises(ValueError, match=r"v_proj.weight.*has shape \(32, 64\).*\(64, 64\)"):
        compute_streamed(wrong, _config("pissa"), tmp_path / "out", device="cpu")

    with pytest.raises(FileNotFoundError, match="No checkpoint directory"):
        compute_streamed(tmp_path / "absent", _config("pissa"), tmp_path / "out")


def test_data_driven_variant_and_bad_memory_are_refused(sharded_base: Path, tmp_path: Path) -> None:
    @registry.register_variant("test-needs-data", needs_gradients=True, overwrite=True)
    def needs_data(inputs):  # pragma: no cover - never called
        raise AssertionError

    try:
        with pytest.raises(ValueError, match="needs calibration data; use inilora_init"):
            compute_streamed(sharded_base, InitConfig("test-needs-data"), tmp_path / "out")
    finally:
        registry._REGISTRY.pop("test-needs-data")
    with pytest.raises(ValueError, match="size like '512MB'"):
        compute_streamed(sharded_base, _config("pissa"), tmp_path / "out", max_memory="lots")
    assert parse_memory("2GB") == 2_000_000_000 and parse_memory("512MiB") == 512 << 20


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_compute_streams_with_max_memory(sharded_base: Path, tmp_path: Path, monkeypatch) -> None:
    import inilora_hf.factorsets.streaming as streaming
    from inilora_hf.cli.app import main

    calls = []
    real = streaming.compute_streamed
    monkeypatch.setattr(streaming, "compute_streamed", lambda *a, **k: calls.append(k) or real(*a, **k))
    out = tmp_path / "out"
    argv = [
        "compute",
        str(sharded_base),
        "--variant",
        "inilora",
        "--rank",
        "4",
        "--targets",
        "q_proj,v_proj",
        "--out",
        str(out),
        "--max-memory",
        "1MB",
        "--device",
        "cpu",
        "-o",
        "steps=200",
    ]
    assert main(argv) == 0
    assert calls and calls[0]["max_memory"] == "1MB"
    _assert_same_factors(
        FactorSet.from_pretrained(out),
        _in_memory(sharded_base, "inilora"),
        atol=_grouping_tolerance("inilora", tiny_llama(seed=1)),
    )
