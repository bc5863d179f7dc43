"""PiSSA and MiLoRA: the principal (largest) or minor (smallest) r singular triplets of W0, split evenly
between B and A; the base weight becomes the residual W0 − s·B·A. Both are the IniLoRA paper's baselines."""

from __future__ import annotations

from inilora_hf.linalg.fit import svd_factors
from inilora_hf.linalg.grouping import stack

from .citations import MILORA, PISSA
from .inputs import VariantInputs
from .registry import ModuleFactors, register_variant


def singular_factors(inputs: VariantInputs, *, smallest: bool) -> dict[str, ModuleFactors]:
    """Balanced SVD factors of every `W0 / s` (top-r, or bottom-r with `smallest=True`; each module's own r and s),
    batched by shape and rank."""
    config = inputs.config
    targets = {name: weight.float() / config.scaling_for(name) for name, weight in inputs.weights.items()}
    factors = {}
    for rank, names in inputs.rank_groups(targets):
        lora_B, lora_A = svd_factors(stack(targets, names, device=inputs.device), rank, smallest=smallest)
        factors.update({n: ModuleFactors(lora_A[i].cpu(), lora_B[i].cpu()) for i, n in enumerate(names)})
    return factors


@register_variant(
    "pissa",
    residual=True,
    defaults={},
    description="PiSSA: top-r singular triplets of W0, balanced √S split; base weight becomes W0 − s·B·A.",
    citation=PISSA,
    approximates_weight=True,
)
def pissa(inputs: VariantInputs) -> dict[str, ModuleFactors]:
    """Principal singular components (exact full SVD in fp32, as PEFT's `init_lora_weights="pissa"`)."""
    return singular_factors(inputs, smallest=False)


@register_variant(
    "milora",
    residual=True,
    defaults={},
    description="MiLoRA: bottom-r singular triplets of W0, balanced √S split; base weight becomes W0 − s·B·A.",
    citation=MILORA,
    approximates_weight=True,
)
def milora(inputs: VariantInputs) -> dict[str, ModuleFactors]:
    """Minor singular components: the r smallest singular values and their vectors."""
    return singular_factors(inputs, smallest=True)
