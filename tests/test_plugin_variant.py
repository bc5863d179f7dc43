"""A third-party variant, defined here with `@register_variant`, gets the whole pipeline for free: caching, a
Hub round trip, training, and conversion to checkpoints that plain transformers / PEFT load."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from inilora_hf import FactorSet, ModuleFactors, VariantInputs, convert, inilora_init, register_variant
from tests import helpers

RANK, ALPHA = 4, 8
TOLERANCE = 1e-4
INPUT_IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))
REPO = "tester/tiny-llama-plugin-projection"


@register_variant(
    "plugin-projection",
    residual=True,
    defaults={"seed": 0},
    description="Test plug-in: A = r random orthonormal rows, B = (W0 / s)·Aᵀ; base becomes W0 − s·B·A.",
)
def plugin_projection(inputs: VariantInputs) -> dict[str, ModuleFactors]:
    """s·B·A is W0 projected onto a random r-dimensional subspace of its input space."""
    rank, scaling = inputs.config.rank, inputs.config.scaling
    generator = torch.Generator().manual_seed(inputs.config.options["seed"])
    factors = {}
    for name in sorted(inputs.weights):
        weight = inputs.weights[name]
        basis = torch.linalg.qr(torch.randn(weight.shape[1], rank, generator=generator)).Q  # (in, r), orthonormal
        factors[name] = ModuleFactors(lora_A=basis.T.contiguous(), lora_B=(weight / scaling) @ basis)
    return factors


def make_init(base_dir: Path, cache_dir: Path, **kwargs):
    return inilora_init(
        base_dir, variant="plugin-projection", rank=RANK, lora_alpha=ALPHA, cache_dir=cache_dir, **kwargs
    )


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    return helpers.logits_of(model, INPUT_IDS)


def test_plugin_variant_goes_through_the_whole_pipeline(hub, tiny_base_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = make_init(tiny_base_dir, cache)
    computed = first.prepare()
    assert first.factor_source == "computed"
    assert computed.config.variant == "plugin-projection" and computed.config.options == {"seed": 0}

    second = make_init(tiny_base_dir, cache)  # a new process would do the same: the key is on disk
    cached = second.prepare()
    assert second.factor_source.startswith("cache:")
    for name, factors in computed.factors.items():
        assert torch.equal(cached.factors[name].lora_A, factors.lora_A)
        assert torch.equal(cached.factors[name].lora_B, factors.lora_B)
    other_seed = make_init(tiny_base_dir, cache, seed=1)
    other_seed.prepare()
    assert other_seed.factor_source == "computed"  # options are part of the key

    computed.push_to_hub(REPO)
    assert {"factors.safetensors", "inilora_factors.json", "README.md"} <= set(hub.store.repo(REPO).files())
    pulled = FactorSet.from_pretrained(REPO)
    assert pulled.config == computed.config and pulled.info["source_repo"] == REPO
    assert all(torch.equal(pulled.factors[n].lora_B, f.lora_B) for n, f in computed.factors.items())

    model = inilora_init(tiny_base_dir, factors=REPO)()
    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    base_logits = logits_of(base)
    # Residual: the init leaves the model unchanged, up to fp32 rounding of R + s·B·A against W0.
    assert (logits_of(model) - base_logits).abs().max() <= helpers.fp32_logits_tolerance(base, INPUT_IDS, RANK)

    helpers.train_a_few_steps(model, steps=1)
    trained = logits_of(model)
    assert (trained - base_logits).abs().max() > 1e-3  # the step moved the model

    convert.to_merged(model, tmp_path / "merged")
    convert.to_lora(model, tmp_path / "lora")
    result = helpers.reload_exports_without_inilora(
        tiny_base_dir, tmp_path / "merged", tmp_path / "lora", INPUT_IDS, trained, tmp_path
    )
    assert result["inilora_hf_imported"] is False
    assert result["r"] == 2 * RANK  # residual variant: A' = [A; A0], B' = [B, −B0]
    assert result["merged"] <= TOLERANCE and result["lora"] <= TOLERANCE
