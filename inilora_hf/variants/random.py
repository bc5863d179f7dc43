"""Random inits: PEFT's `lora` / `gaussian` (B = 0, base untouched) and IniLoRA-α / IniLoRA-β (residual).

Each module draws from its own `torch.Generator`, seeded from the `seed` option and the module's name, so a
factor set is reproducible and independent of batching, of module order, and of which subset of modules
is computed at once (the streamed `compute` relies on that).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
from torch import nn

from .citations import INILORA, LORA
from .inputs import VariantInputs
from .registry import ModuleFactors, register_variant, require

DrawFn = Callable[[str, torch.Tensor, torch.Tensor, torch.Generator], None]


def check_seed(options: dict) -> None:
    """Option validator of variants whose only random input is the `seed` option: it must be an integer."""
    require(isinstance(options["seed"], int), f"`seed` must be an integer, got {options['seed']!r}.")


def module_seed(seed: int, name: str) -> int:
    """The 64-bit seed of one module: the first 8 bytes (little-endian) of sha256(f"{seed}/{name}").

    Example:
        >>> module_seed(0, "q") == module_seed(0, "q") != module_seed(1, "q")
        True
    """
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little")


def module_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from `(seed, module name)`: the same draws wherever and whenever the module is drawn.

    Example:
        >>> first = torch.randn(3, generator=module_generator(0, "q"))
        >>> torch.equal(first, torch.randn(3, generator=module_generator(0, "q")))
        True
    """
    return torch.Generator().manual_seed(module_seed(seed, name))


def draw_factors(inputs: VariantInputs, fill: DrawFn) -> dict[str, ModuleFactors]:
    """Allocate fp32 A `(r, in)` and B `(out, r)` per module (its own r) and let `fill(name, A, B, generator)` draw
    them."""
    factors = {}
    for name in sorted(inputs.weights):
        rank = inputs.config.rank_for(name)
        out_features, in_features = inputs.weights[name].shape
        lora_A = torch.empty(rank, in_features)
        lora_B = torch.empty(out_features, rank)
        fill(name, lora_A, lora_B, module_generator(inputs.config.options["seed"], name))
        factors[name] = ModuleFactors(lora_A, lora_B)
    return factors


@register_variant(
    "lora",
    residual=False,
    defaults={"seed": 0},
    check=check_seed,
    description="PEFT default: Kaiming-uniform A (a=√5), B = 0; base weight unchanged.",
    citation=LORA,
)
def lora(inputs: VariantInputs) -> dict[str, ModuleFactors]:
    """Standard LoRA: A ~ Kaiming-uniform(a=√5) as in `nn.Linear`, B = 0."""

    def fill(name: str, lora_A: torch.Tensor, lora_B: torch.Tensor, generator: torch.Generator) -> None:
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5), generator=generator)
        lora_B.zero_()

    return draw_factors(inputs, fill)


@register_variant(
    "gaussian",
    residual=False,
    defaults={"seed": 0},
    check=check_seed,
    description="PEFT's gaussian: A ~ N(0, 1/r²), B = 0; base weight unchanged.",
    citation=LORA,
)
def gaussian(inputs: VariantInputs) -> dict[str, ModuleFactors]:
    """PEFT's `init_lora_weights="gaussian"`: A ~ N(0, (1/r)²) with each module's r, B = 0."""

    def fill(name: str, lora_A: torch.Tensor, lora_B: torch.Tensor, generator: torch.Generator) -> None:
        nn.init.normal_(lora_A, std=1.0 / lora_A.shape[0], generator=generator)
        lora_B.zero_()

    return draw_factors(inputs, fill)


def _check_alpha(options: dict) -> None:
    check_seed(options)
    sigma = options["sigma"]
    require(isinstance(sigma, (int, float)) and sigma > 0, f"`sigma` must be a positive number, got {sigma!r}.")


@register_variant(
    "inilora-alpha",
    residual=True,
    defaults={"seed": 0, "sigma": 0.5},
    check=_check_alpha,
    description="IniLoRA-α: A, B ~ N(0, σ²) (σ = 0.5), no fit; base weight becomes W0 − s·B·A.",
    citation=INILORA,
)
def inilora_alpha(inputs: VariantInputs) -> dict[str, ModuleFactors]:
    """IniLoRA-α: both factors from a wide Gaussian N(0, σ²), σ = 0.5 by default."""
    sigma = float(inputs.config.options["sigma"])

    def fill(name: str, lora_A: torch.Tensor, lora_B: torch.Tensor, generator: torch.Generator) -> None:
        nn.init.normal_(lora_A, std=sigma, generator=generator)
        nn.init.normal_(lora_B, std=sigma, generator=generator)

    return draw_factors(inputs, fill)


def _check_beta(options: dict) -> None:
    check_seed(options)
    require(
        options["kaiming"] in ("normal", "uniform"),
        f"`kaiming` must be 'normal' or 'uniform', got {options['kaiming']!r}.",
    )


@register_variant(
    "inilora-beta",
    residual=True,
    defaults={"seed": 0, "kaiming": "normal"},
    check=_check_beta,
    description="IniLoRA-β: Kaiming (fan_in, a=0) normal or uniform on both A and B, no fit; base becomes W0 − s·B·A.",
    citation=INILORA,
)
def inilora_beta(inputs: VariantInputs) -> dict[str, ModuleFactors]:
    """IniLoRA-β: torch's Kaiming defaults (fan_in, a=0, gain √2) on A `(r, in)` and B `(out, r)`."""
    init = nn.init.kaiming_normal_ if inputs.config.options["kaiming"] == "normal" else nn.init.kaiming_uniform_

    def fill(name: str, lora_A: torch.Tensor, lora_B: torch.Tensor, generator: torch.Generator) -> None:
        init(lora_A, generator=generator)
        init(lora_B, generator=generator)

    return draw_factors(inputs, fill)
