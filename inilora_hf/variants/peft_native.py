"""PEFT's own per-layer inits as variants: `olora`, `orthogonal`, `pissa_niter` (PEFT's `pissa_niter_K`) and `mica`.

They are computed by PEFT itself, never re-implemented: each target weight `W0` is copied into a scratch module
holding one `nn.Linear`, `peft.get_peft_model(scratch, LoraConfig(init_lora_weights=...))` runs PEFT's init on it,
and the resulting `lora_A` / `lora_B` are harvested. PEFT serves as a library of init functions on a copy of the
weight; the user's model is never touched, as for every variant.

What PEFT did besides writing A and B is checked against what the variant is registered with, so that a PEFT
version that changes an init fails loudly instead of silently giving other factors (`PeftInitError`):

* a base-mutating init (`olora`, `pissa_niter`) must leave `W0 − s·B·A` in the scratch weight, up to fp32
  rounding: that is the residual `inilora_hf.adapters.apply` recomputes from the stored A, B (`residual=True`);
* the others (`orthogonal`, `mica`) must leave `W0` bit for bit (`residual=False`);
* the factors PEFT freezes for training (MiCA's `lora_B`) must be the variant's `frozen_factors`.

Random draws (`orthogonal`'s Gaussians, `pissa_niter`'s randomized SVD) come from torch's global generator inside
PEFT. Each module seeds it with `module_seed(seed, module name)` inside `torch.random.fork_rng`, so a factor set is
reproducible, independent of module order, of streaming and of the split across ranks, and the caller's random
state is left as it was. Plain PEFT gives the same factors when seeded the same way right before it wraps that
module alone (`torch.manual_seed(module_seed(seed, name)); get_peft_model(model, LoraConfig(target_modules=[name],
...))`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import peft
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from inilora_hf.errors import PeftInitError

from .citations import MICA, OLORA, ORTHOGONAL, PISSA
from .inputs import VariantInputs
from .random import check_seed, module_seed
from .registry import ModuleFactors, VariantSpec, get_variant, register_variant, require

FP32_UNIT_ROUNDOFF = 2.0**-24

#: The PEFT release whose inits these variants were checked against (tests/test_peft_inits.py).
CHECKED_PEFT_VERSION = "0.21.2"
_FIX = (
    f"These variants were checked against PEFT {CHECKED_PEFT_VERSION}: install it (`pip install "
    f"peft=={CHECKED_PEFT_VERSION}`) or report the change to inilora_hf."
)

#: The default `niter` of `pissa_niter`: PEFT's PiSSA recipe passes `init_lora_weights="pissa_niter_4"`.
DEFAULT_NITER = 4


@dataclass
class PeftLayerInit:
    """What PEFT's init left on one scratch layer.

    Attributes:
        lora_A: `(r, in)`, fp32.
        lora_B: `(out, r)`, fp32.
        base_weight: The scratch layer's weight afterwards (`W0`, or the residual PEFT wrote).
        frozen: The factors PEFT declared frozen for training (`frozen_peft_weight_names`).
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    base_weight: torch.Tensor
    frozen: tuple[str, ...]


def run_peft_init(
    weight: torch.Tensor,
    init_lora_weights: str,
    *,
    rank: int,
    lora_alpha: float,
    use_rslora: bool = False,
    seed: int | None = None,
) -> PeftLayerInit:
    """Run PEFT's `LoraConfig(init_lora_weights=...)` on a scratch `nn.Linear` holding a copy of `weight` `(out, in)`.

    With `seed`, torch's global generators (CPU, and the weight's CUDA device) are seeded with it for the call; the
    caller's random state is restored afterwards either way.

    Example:
        >>> out = run_peft_init(torch.randn(8, 6), "olora", rank=2, lora_alpha=2)
        >>> out.lora_A.shape, out.lora_B.shape
        (torch.Size([2, 6]), torch.Size([8, 2]))
    """
    scratch = nn.Module()
    scratch.linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    scratch.linear.weight = nn.Parameter(weight.detach().to(torch.float32, copy=True), requires_grad=False)
    config = LoraConfig(
        r=rank,
        lora_alpha=lora_alpha,  # type: ignore[arg-type]  # PEFT annotates int but takes any positive number
        use_rslora=use_rslora,
        target_modules=["linear"],
        init_lora_weights=init_lora_weights,  # type: ignore[arg-type]  # PEFT's Literal lacks "pissa_niter_K"
    )
    with torch.random.fork_rng(devices=[weight.device] if weight.device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        layer = cast(LoraLayer, get_peft_model(scratch, config).get_base_model().get_submodule("linear"))
    return PeftLayerInit(
        lora_A=cast(nn.Linear, layer.lora_A["default"]).weight.detach().float(),
        lora_B=cast(nn.Linear, layer.lora_B["default"]).weight.detach().float(),
        base_weight=cast(nn.Linear, layer.get_base_layer()).weight.detach(),
        frozen=tuple(layer.frozen_peft_weight_names.get("default", ())),
    )


def check_peft_init(
    name: str,
    weight: torch.Tensor,
    result: PeftLayerInit,
    spec: VariantSpec,
    scaling: float,
    *,
    storage_dtype: torch.dtype = torch.float32,
) -> None:
    """Raise `PeftInitError` unless PEFT's init of module `name` did what `spec` declares (see the module doc).

    The residual PEFT wrote and `torch.addmm(W0, B, A, alpha=−s)` (what `apply` stores) each sum r products, scale
    and subtract: each is within γ_{r+2}·(|W0| + s·|B|·|A|) of the exact `W0 − s·B·A`, elementwise. A base stored
    in a narrower `storage_dtype` (PEFT casts the residual to it) adds that dtype's unit roundoff times |residual|.
    """
    peft_says = f"PEFT {peft.__version__}'s init for variant {spec.name!r} on {name!r}"
    if result.frozen != spec.frozen_factors:
        raise PeftInitError(
            f"{peft_says} freezes {list(result.frozen)} for training, but the variant declares "
            f"{list(spec.frozen_factors)}. {_FIX}"
        )
    if not spec.residual:
        if not torch.equal(result.base_weight.float(), weight):
            raise PeftInitError(
                f"{peft_says} changed the base weight, but the variant is registered with residual=False. {_FIX}"
            )
        return
    rounds = result.lora_A.shape[0] + 2
    gamma = rounds * FP32_UNIT_ROUNDOFF / (1 - rounds * FP32_UNIT_ROUNDOFF)
    bound = 2 * gamma * (weight.abs() + scaling * (result.lora_B.abs() @ result.lora_A.abs()))
    residual = torch.addmm(weight, result.lora_B, result.lora_A, alpha=-scaling)
    if storage_dtype != torch.float32:
        bound = bound + torch.finfo(storage_dtype).eps / 2 * residual.abs()
    if not bool(((result.base_weight - residual).abs() <= bound).all()):
        raise PeftInitError(
            f"{peft_says} left a base weight other than W0 − s·B·A (beyond fp32 rounding), which inilora_hf "
            f"recomputes from the stored factors. {_FIX}"
        )


def harvest(inputs: VariantInputs, init_lora_weights: str, *, seeded: bool) -> dict[str, ModuleFactors]:
    """Every target's A, B as PEFT's `init_lora_weights` computes them, checked by `check_peft_init`; with `seeded`,
    each module's draws are seeded with `module_seed(options["seed"], module name)`."""
    config = inputs.config
    spec = get_variant(config.variant)
    factors = {}
    for name in sorted(inputs.weights):
        weight = inputs.weights[name].to(inputs.device, torch.float32)
        result = run_peft_init(
            weight,
            init_lora_weights,
            rank=config.rank_for(name),
            lora_alpha=config.alpha_for(name),
            use_rslora=config.use_rslora,
            seed=module_seed(config.options["seed"], name) if seeded else None,
        )
        check_peft_init(name, weight, result, spec, config.scaling_for(name))
        factors[name] = ModuleFactors(result.lora_A.cpu(), result.lora_B.cpu())
    return factors


@register_variant(
    "olora",
    residual=True,
    defaults={},
    description="OLoRA (PEFT's own): W0 = QR, B = Q's first r columns, A = R's first r rows; base becomes W0 − s·B·A.",
    citation=OLORA,
)
def olora(inputs: VariantInputs) -> dict[str, ModuleFactors]:
    """PEFT's `init_lora_weights="olora"` (deterministic)."""
    return harvest(inputs, "olora", seeded=False)


@register_variant(
    "orthogonal",
    residual=False,
    defaults={"seed": 0},
    check=check_seed,
    description="PEFT's orthogonal: Gaussian A, B through complementary rows of a random orthogonal r×r (B·A = 0); "
    "base weight unchanged.",
    citation=ORTHOGONAL,
)
def orthogonal(inputs: VariantInputs) -> dict[str, ModuleFactors]:
    """PEFT's `init_lora_weights="orthogonal"` (even rank only), seeded per module."""
    return harvest(inputs, "orthogonal", seeded=True)


def _check_pissa_niter(options: dict) -> None:
    check_seed(options)
    niter = options["niter"]
    require(
        isinstance(niter, int) and not isinstance(niter, bool) and niter >= 0,
        f"`niter` (subspace iterations of the randomized SVD) must be a non-negative integer, got {niter!r}.",
    )


@register_variant(
    "pissa_niter",
    residual=True,
    defaults={"seed": 0, "niter": DEFAULT_NITER},
    check=_check_pissa_niter,
    description="PiSSA with PEFT's randomized SVD (pissa_niter_K, K = niter, default 4); base becomes W0 − s·B·A.",
    citation=PISSA,
    approximates_weight=True,
    aliases=("pissa-niter",),
)
def pissa_niter(inputs: VariantInputs) -> dict[str, ModuleFactors]:
    """PEFT's `init_lora_weights=f"pissa_niter_{niter}"` (`torch.svd_lowrank`), seeded per module."""
    return harvest(inputs, f"pissa_niter_{inputs.config.options['niter']}", seeded=True)


@register_variant(
    "mica",
    residual=False,
    defaults={},
    description="MiCA (PEFT's own): B = left singular vectors of the r smallest singular values (frozen), A = 0.",
    citation=MICA,
    frozen_factors=("lora_B",),
)
def mica(inputs: VariantInputs) -> dict[str, ModuleFactors]:
    """PEFT's `init_lora_weights="mica"` (deterministic); only A trains."""
    return harvest(inputs, "mica", seeded=False)
