"""Variants: what each does to A, B and the base weight, checked against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from inilora_hf import InitConfig, get_variant, inilora_init
from inilora_hf.variants import VariantInputs
from tests.conftest import tiny_llama
from tests.helpers import adam_drift_bound, fp32_gamma, truncated_svd_tolerance

RESIDUAL_VARIANTS = ["inilora", "inilora-alpha", "inilora-beta", "pissa", "milora"]
FAST = {"inilora": {"steps": 200}}
INPUT_IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def run_variant(name: str, weights: dict[str, torch.Tensor], rank: int = 8, **options) -> dict:
    config = InitConfig(
        name, rank=rank, target_modules=sorted({n.rsplit(".", 1)[-1] for n in weights}), options=options
    )
    return get_variant(name).compute(VariantInputs(weights=weights, config=config))


@pytest.mark.parametrize("variant", RESIDUAL_VARIANTS)
def test_residual_variants_keep_base_outputs_in_fp32(variant: str) -> None:
    base = tiny_llama()
    with torch.no_grad():
        expected = base(INPUT_IDS).logits
    model = inilora_init(base, variant=variant, **FAST.get(variant, {}))()
    with torch.no_grad():
        actual = model(INPUT_IDS).logits
    assert (actual - expected).abs().max().item() <= 1e-4
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    original = base.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(layer.base_layer.weight, original), "a residual variant must change the base weight"
    assert model.init_report.residual


def test_bf16_deviation_is_reported_and_matches_independent_computation() -> None:
    base = tiny_llama().to(torch.bfloat16)
    model = inilora_init(base, variant="inilora-alpha")()
    worst, fp32_noise = 0.0, 0.0
    for name, module in model.get_base_model().named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            w0 = base.get_submodule(name).weight.float()
            residual = module.base_layer.weight.float()
            lora_B, lora_A = module.lora_B["default"].weight.float(), module.lora_A["default"].weight.float()
            delta = module.scaling["default"] * (lora_B @ lora_A)
            worst = max(worst, (residual + delta - w0).abs().max().item())
            # Both sides add in fp32: an r-term product and two sums, each within γ_(r+2) of its magnitude.
            magnitude = residual.abs() + module.scaling["default"] * (lora_B.abs() @ lora_A.abs()) + w0.abs()
            fp32_noise = max(fp32_noise, 2 * fp32_gamma(lora_A.shape[0] + 2) * magnitude.max().item())
    report = model.init_report
    assert report.modules[0].storage_dtype == "bfloat16"
    assert report.max_reconstruction_error == pytest.approx(worst, rel=0, abs=fp32_noise)
    # bf16 rounding of R ≈ −s·B·A (|entries| ~ 1) is far above fp32 noise: the report must show it.
    assert report.max_reconstruction_error > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["inilora-alpha", "gaussian"])
def test_blockwise_residual_and_report_match_a_whole_matrix_computation(
    variant: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """R and the report are computed a few rows at a time; 5-row blocks (a partial last one) give the same R
    (up to one rounding) and exactly the errors of a whole-matrix numpy computation."""
    from inilora_hf.adapters import apply

    monkeypatch.setattr(apply, "BLOCK_ELEMENTS", 5 * 64)
    base = tiny_llama().to(dtype)
    model = inilora_init(base, variant=variant)()
    by_name = {m.name: m for m in model.init_report.modules}
    for name, module in model.get_base_model().named_modules():
        if not (hasattr(module, "lora_A") and "default" in module.lora_A):
            continue
        w0 = base.get_submodule(name).weight.detach().double().numpy()
        lora_B, lora_A = (
            module.lora_B["default"].weight.detach().double().numpy(),
            module.lora_A["default"].weight.detach().double().numpy(),
        )
        delta = module.scaling["default"] * (lora_B @ lora_A)
        magnitude = np.abs(w0) + module.scaling["default"] * (np.abs(lora_B) @ np.abs(lora_A))
        stored = module.base_layer.weight.detach().double().numpy()
        if model.init_report.residual:
            expected_r = torch.from_numpy(w0 - delta).to(dtype).float().numpy()
            # One storage-dtype ulp (a rounding flip) plus the fp32 rounding of an r-term product and a difference.
            tolerance = np.abs(expected_r) * (2.0**-7 if dtype == torch.bfloat16 else 0) + 2.0**-20 * magnitude
            assert np.all(np.abs(stored - expected_r) <= tolerance), "R = W0 − s·B·A, rounded once to the storage dtype"
        else:
            assert np.array_equal(stored, w0), "a non-residual variant leaves the base weight alone"
        error = stored + delta - w0
        report = by_name[name]
        fp32_noise = 2.0**-20 * magnitude.max()  # the report adds in fp32; numpy here in float64
        assert report.reconstruction_max_abs == pytest.approx(np.abs(error).max(), rel=1e-4, abs=fp32_noise)
        assert report.reconstruction_rel == pytest.approx(
            np.linalg.norm(error) / np.linalg.norm(w0),
            rel=1e-4,
            abs=fp32_noise * np.sqrt(error.size) / np.linalg.norm(w0),
        )
        if dtype == torch.bfloat16 and model.init_report.residual:
            assert report.reconstruction_max_abs > 100 * fp32_noise, "the bf16 rounding of R is visible in the report"


def test_inilora_default_fit_reaches_svd_optimum() -> None:
    base = tiny_llama()
    init = inilora_init(base, variant="inilora")  # the authors' defaults: 20 000 Adam steps
    factor_set = init.prepare()
    for name, factors in factor_set.factors.items():
        w0 = base.get_submodule(name).weight.detach().double().numpy()
        singular = np.linalg.svd(w0, compute_uv=False)
        optimum = (singular[8:] ** 2).sum() / w0.size
        fitted = ((factors.lora_B.double() @ factors.lora_A.double()).numpy() - w0) ** 2
        assert fitted.mean() <= 1.05 * optimum, name
        assert factor_set.stats[name]["mse_ratio"] == pytest.approx(fitted.mean() / optimum, rel=1e-3)


def test_inilora_batched_fit_equals_one_matrix_at_a_time() -> None:
    base = tiny_llama()
    weights = {n: m.weight.detach().float() for n, m in base.named_modules() if n.endswith(("q_proj", "v_proj"))}
    config = InitConfig("inilora", rank=4, options={"steps": 300, "step_size": 100})
    spec = get_variant("inilora")
    batched = spec.compute(VariantInputs(weights=weights, config=config))
    single = spec.compute(VariantInputs(weights=weights, config=config, max_group_bytes=1))  # one matrix per group
    # The same operations per matrix: only a BLAS that blocks a batch differently may round differently.
    drift = adam_drift_bound(300, 5e-4, step_size=100, accumulation=64 + 4 + 3)
    for name in weights:
        torch.testing.assert_close(batched[name].lora_A, single[name].lora_A, rtol=0, atol=drift)
        torch.testing.assert_close(batched[name].lora_B, single[name].lora_B, rtol=0, atol=drift)


def test_inilora_fits_scaled_product_when_alpha_differs_from_rank() -> None:
    weights = {"layer.q_proj": torch.randn(48, 40, generator=torch.Generator().manual_seed(0)) * 0.02}
    config = InitConfig("inilora", rank=4, lora_alpha=16, target_modules=["q_proj"], options={"solver": "svd"})
    factors = get_variant("inilora").compute(VariantInputs(weights=weights, config=config))["layer.q_proj"]
    u, s, vh = np.linalg.svd(weights["layer.q_proj"].double().numpy())
    best = (u[:, :4] * s[:4]) @ vh[:4]
    scaled = config.scaling * (factors.lora_B.double() @ factors.lora_A.double()).numpy()
    assert config.scaling == 4.0
    np.testing.assert_allclose(scaled, best, rtol=0, atol=truncated_svd_tolerance(s, (48, 40), 4))


def test_inilora_fast_solvers_reach_the_optimum() -> None:
    rng = np.random.default_rng(5)
    matrix = rng.standard_normal((96, 80)) * np.linspace(1, 0.01, 80)  # decaying column scales
    weights = {"layer.q_proj": torch.tensor(matrix, dtype=torch.float32)}
    singular = np.linalg.svd(matrix, compute_uv=False)
    optimum = (singular[8:] ** 2).sum() / matrix.size
    for solver in ("svd", "rsvd"):
        factors = run_variant("inilora", weights, solver=solver)["layer.q_proj"]
        mse = (((factors.lora_B.double() @ factors.lora_A.double()).numpy() - matrix) ** 2).mean()
        assert mse <= 1.001 * optimum, solver


def test_inilora_alpha_draws_wide_gaussians() -> None:
    weights = {f"l{i}.q_proj": torch.zeros(512, 512) for i in range(2)}
    factors = run_variant("inilora-alpha", weights)
    values_A = torch.cat([f.lora_A.flatten() for f in factors.values()])
    values_B = torch.cat([f.lora_B.flatten() for f in factors.values()])
    assert values_A.std().item() == pytest.approx(0.5, rel=0.05)
    assert values_B.std().item() == pytest.approx(0.5, rel=0.05)
    assert abs(values_A.mean().item()) < 0.02


@pytest.mark.parametrize("mode", ["normal", "uniform"])
def test_inilora_beta_uses_kaiming_fan_in(mode: str) -> None:
    rank, fan_in = 8, 1024
    weights = {f"l{i}.q_proj": torch.zeros(1024, fan_in) for i in range(2)}
    factors = run_variant("inilora-beta", weights, rank=rank, kaiming=mode)
    values_A = torch.cat([f.lora_A.flatten() for f in factors.values()])
    values_B = torch.cat([f.lora_B.flatten() for f in factors.values()])
    # torch defaults a=0, fan_in, leaky_relu → gain √2, std = √2/√fan_in (A: fan_in=in, B: fan_in=r).
    assert values_A.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)
    assert values_B.std().item() == pytest.approx(math.sqrt(2 / rank), rel=0.05)
    if mode == "uniform":
        assert values_B.abs().max().item() <= math.sqrt(6 / rank) + 1e-6


def test_lora_and_gaussian_leave_base_untouched_with_zero_B() -> None:
    base = tiny_llama()
    for variant, bound in (("lora", lambda fan_in: 1 / math.sqrt(fan_in)), ("gaussian", None)):
        model = inilora_init(base, variant=variant)()
        layer = model.get_base_model().model.layers[1].self_attn.v_proj
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        assert torch.equal(layer.base_layer.weight, base.model.layers[1].self_attn.v_proj.weight)
        if bound is not None:
            assert layer.lora_A["default"].weight.abs().max().item() <= bound(64)
        else:
            assert layer.lora_A["default"].weight.std().item() == pytest.approx(1 / 8, rel=0.15)


def test_pissa_and_milora_match_independent_svd() -> None:
    # A well-separated spectrum (10 … 1) keeps the singular subspaces well conditioned in fp32.
    rng = np.random.default_rng(3)
    left, _ = np.linalg.qr(rng.standard_normal((40, 32)))
    right, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    matrix = (left * np.linspace(10, 1, 32)) @ right.T
    weights = {"layer.q_proj": torch.tensor(matrix, dtype=torch.float32)}
    u, s, vh = np.linalg.svd(matrix, full_matrices=False)
    for variant, keep in (("pissa", slice(0, 4)), ("milora", slice(28, 32))):
        factors = run_variant(variant, weights, rank=4)["layer.q_proj"]
        product = (factors.lora_B.double() @ factors.lora_A.double()).numpy()
        tolerance = truncated_svd_tolerance(s, matrix.shape, 4, smallest=variant == "milora")
        np.testing.assert_allclose(product, (u[:, keep] * s[keep]) @ vh[keep], rtol=0, atol=tolerance)


def test_seed_makes_random_variants_reproducible() -> None:
    weights = {"layer.q_proj": torch.zeros(16, 16)}
    first = run_variant("inilora-alpha", weights, seed=3)["layer.q_proj"].lora_A
    again = run_variant("inilora-alpha", weights, seed=3)["layer.q_proj"].lora_A
    other = run_variant("inilora-alpha", weights, seed=4)["layer.q_proj"].lora_A
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize(("tf32", "during_fit"), [(False, "highest"), (True, "high")])
def test_inilora_fit_ignores_a_global_tf32_switch_unless_asked(
    tf32: bool, during_fit: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training scripts often turn TF32 on globally; the fit runs in full fp32 unless `tf32=True`."""
    from inilora_hf.variants import approximation

    seen = []
    original = approximation.adam_fit

    def recording(*args, **kwargs):
        seen.append(torch.get_float32_matmul_precision())
        return original(*args, **kwargs)

    monkeypatch.setattr(approximation, "adam_fit", recording)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # what `torch.backends.cuda.matmul.allow_tf32 = True` sets
    try:
        init = inilora_init(tiny_llama(), variant="inilora", steps=10, tf32=tf32)
        init.prepare()
        assert torch.get_float32_matmul_precision() == "high", "the caller's setting is restored"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert seen and set(seen) == {during_fit}
    assert init.config.options["tf32"] is tf32, "tf32 is part of the config, hence of the cache key"


def test_inilora_rejects_a_non_boolean_tf32() -> None:
    with pytest.raises(ValueError, match="`tf32` must be True or False"):
        inilora_init(tiny_llama(), variant="inilora", tf32="yes").prepare()
