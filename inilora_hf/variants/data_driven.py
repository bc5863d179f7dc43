"""Data-driven variants: factors computed from the training loss on calibration data, not from W0 alone.

`lora-sb` (LoRA-SB, Ponkshe, Singhal et al., arXiv 2411.19557; reference code CERT-Lab/lora-sb): estimate the
first full fine-tuning step `ΔW = −η·sign(G)` (the first Adam step, `G = Σ_b ∇_W (loss_b / n_b)` over the
calibration samples) and start training from its best rank-r approximation in the LoRA-XS architecture:
`B = U_r` (frozen), `A = V_rᵀ` (frozen), trainable core `R = Σ_r / s`, so that `s·B·R·A = trunc_r(ΔW)`. W0 is
left untouched (the model starts at W0 + trunc_r(ΔW), i.e. after an approximate first step).

CNTLoRA (arXiv 2507.08044) is not here: only its abstract is available, which does not give the closed form.
The activation statistics such a method needs are in `inilora_hf.training.calibration.input_covariances`.
"""

from __future__ import annotations

import math

import torch

from inilora_hf.linalg.grouping import stack

from .citations import LORA_SB
from .inputs import VariantInputs
from .registry import ModuleFactors, register_variant, require

# The key of the LoRA-XS core in `ModuleFactors.extra`; `inilora_hf.adapters.loraxs.CORE_KEY` (not imported: that
# module imports PEFT, which a variant must not need).
CORE_KEY = "lora_core"


def _check_lora_sb(options: dict) -> None:
    eta = options["eta"]
    require(
        eta is None or (isinstance(eta, (int, float)) and not isinstance(eta, bool) and math.isfinite(eta) and eta > 0),
        f"`eta` must be a positive number (the learning rate of the first optimizer step), got {eta!r}.",
    )
    check_calibration(options)


def check_calibration(options: dict) -> None:
    """Validate the `calibration` option every data-driven variant declares: None, or the identity inilora_init
    recorded (`{"sha256", "samples"}`); users pass `calibration_data=` instead.

    Example:
        >>> check_calibration({"calibration": {"sha256": "ab", "samples": 4}})
    """
    calibration = options["calibration"]
    require(
        calibration is None or (isinstance(calibration, dict) and set(calibration) == {"sha256", "samples"}),
        f"`calibration` is set by inilora_init from the calibration data (got {calibration!r}); do not pass it. "
        "Pass `calibration_data=` / `calibration_samples=` instead.",
    )


def truncated_svd_factors(
    update: torch.Tensor, rank: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA-XS factors of the best rank-`rank` approximation of each matrix of a `(L, out, in)` stack.

    Exact fp32 SVD `update = U·diag(S)·Vᵀ`; returns `B = U_r` `(L, out, r)`, `core = diag(S_r) / scaling`
    `(L, r, r)` and `A = V_rᵀ` `(L, r, in)`, so that `scaling·B·core·A` is the truncated SVD, `BᵀB = I` and
    `A·Aᵀ = I`.

    Example:
        >>> update = torch.randn(2, 6, 5)
        >>> B, core, A = truncated_svd_factors(update, 2, scaling=0.5)
        >>> torch.allclose(B.mT @ B, torch.eye(2).expand(2, 2, 2), atol=1e-5), tuple(core.shape)
        (True, (2, 2, 2))
    """
    U, S, Vh = torch.linalg.svd(update.float(), full_matrices=False)
    return U[:, :, :rank], torch.diag_embed(S[:, :rank]) / scaling, Vh[:, :rank, :]


@register_variant(
    "lora-sb",
    residual=False,
    defaults={"eta": None, "calibration": None},
    check=_check_lora_sb,
    description=(
        "LoRA-SB: LoRA-XS (frozen B = U_r, A = V_rᵀ, trainable r×r core Σ_r/s) from the truncated SVD of the "
        "estimated first step −η·sign(G); base weight unchanged."
    ),
    citation=LORA_SB,
    needs_gradients=True,
)
def lora_sb(inputs: VariantInputs) -> dict[str, ModuleFactors]:
    """LoRA-SB: `B·R·A = trunc_r(−η·sign(G))` with orthonormal B, A and `R = Σ_r / s`.

    Options:
        eta: The learning rate of the first optimizer step (required; `inilora_hf.SFTTrainer` derives it from
            its arguments). Sets the scale of the initial update and hence of R.
        calibration: Identity of the calibration samples (set by inilora_init; part of the cache key).
    """
    options = inputs.config.options
    eta = options["eta"]
    if eta is None:
        raise ValueError("lora-sb needs `eta` (the learning rate of the first optimizer step): pass `eta=...`.")
    gradients = inputs.gradients or {}
    missing = sorted(set(inputs.weights) - set(gradients))
    if missing:
        raise ValueError(f"lora-sb got no gradient for {missing[:3]}; the calibration pass did not reach them.")
    factors = {}
    for rank, names in inputs.rank_groups(inputs.weights):
        update = -float(eta) * torch.sign(stack(gradients, names, device=inputs.device))
        lora_B, singular, lora_A = truncated_svd_factors(update, rank, 1.0)
        for i, name in enumerate(names):  # each module's core is Σ_r over its own scaling
            core = singular[i] / inputs.config.scaling_for(name)
            factors[name] = ModuleFactors(lora_A[i].cpu(), lora_B[i].cpu(), {CORE_KEY: core.cpu()})
    return factors
