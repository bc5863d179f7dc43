"""bitsandbytes bases: read a layer's quantization settings, prepare factors whose residual is quantized like the
layer would (`inilora_hf.linalg.bnb`), and measure how far the quantized init is from `W0` next to plain QLoRA's
own error.

With a residual init the frozen weight is `Q(R)`, `R = W0 − s·B·A`, instead of QLoRA's `Q(W0)`. When
`s·B·A` is large (IniLoRA-α: entries ~1 against ~0.02 for W0) the quantization step of `R` is much coarser
than that of `W0`, so `Q(R) + s·B·A` can be far worse than `Q(W0)`; `fidelity` measures it per module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from inilora_hf.factorsets.format import RESIDUAL_KEY
from inilora_hf.linalg.bnb import QUANT_KEYS_4BIT, bnb_bits, quantize_roundtrip
from inilora_hf.linalg.fit import svd_factors
from inilora_hf.variants import ModuleFactors, get_variant
from inilora_hf.variants.config import InitConfig


def layer_settings(module: nn.Module) -> dict[str, Any]:
    """The settings `quantize_roundtrip` must reproduce (JSON-serialisable).

    Example:
        >>> layer_settings(linear_4bit)                               # doctest: +SKIP
        {'bits': 4, 'quant_type': 'nf4', 'blocksize': 64, 'compress_statistics': False, 'quant_storage': 'uint8'}
    """
    bits = bnb_bits(module)
    if bits == 4:
        weight = module.weight
        settings = {"bits": 4, **{key: getattr(weight, key) for key in QUANT_KEYS_4BIT}}
        settings["quant_storage"] = str(settings["quant_storage"]).removeprefix("torch.")
        return settings
    if bits == 8:
        layer_state: Any = module.state  # bitsandbytes' MatmulLtState
        return {"bits": 8, "threshold": float(layer_state.threshold)}
    return {"bits": None}


@dataclass
class Fidelity:
    """Relative Frobenius errors against W0 of the quantized init and of plain QLoRA."""

    init_error: float
    qlora_error: float

    @property
    def ratio(self) -> float:
        """How many times worse than plain QLoRA the quantized init is."""
        return self.init_error / self.qlora_error if self.qlora_error > 0 else float("inf")


def fidelity(
    weight: torch.Tensor, quantized_residual: torch.Tensor, delta: torch.Tensor, settings: dict[str, Any]
) -> Fidelity:
    """`‖deq(Q(R)) + s·B·A − W0‖ / ‖W0‖` next to `‖deq(Q(W0)) − W0‖ / ‖W0‖`, all in fp32."""
    norm = weight.norm().clamp_min(1e-30)
    return Fidelity(
        init_error=float((quantized_residual + delta - weight).norm() / norm),
        qlora_error=float((quantize_roundtrip(weight, settings) - weight).norm() / norm),
    )


def quantization_ready(
    factors: dict[str, ModuleFactors], weights: dict[str, torch.Tensor], config: InitConfig
) -> dict[str, ModuleFactors]:
    """Factors for a quantized base: A, B rounded to the adapter dtype (so `R + s·B·A` holds for the values that
    train), optionally refined LoftQ-style, and the fp32 residual `R = W0 − s·B·A` stored in `extra["residual"]`.

    Refinement (`refine_steps = N`): N times, quantize `R`, then refit B, A to `(W0 − deq(Q(R))) / s` with the
    rank-r SVD, so that `deq(Q(R)) + s·B·A` moves closer to `W0` than one-shot requantization.
    """
    settings = config.quantization
    if settings is None:
        raise ValueError(
            "quantization_ready needs an InitConfig with `quantization` settings (the base's bitsandbytes layers); "
            "build it through inilora_init(..., quantization_config=...)."
        )
    residual_variant = get_variant(config.variant).residual
    adapter_dtype = getattr(torch, settings["adapter_dtype"])
    ready = {}
    for name, module in factors.items():
        scaling, rank = config.scaling_for(name), config.rank_for(name)
        weight = weights[name].float()
        lora_A = module.lora_A.to(adapter_dtype).float()
        lora_B = module.lora_B.to(adapter_dtype).float()
        if not residual_variant:  # the base keeps Q(W0): nothing to requantize or refine
            ready[name] = ModuleFactors(lora_A, lora_B, dict(module.extra))
            continue
        for _ in range(settings["refine_steps"]):
            quantized = quantize_roundtrip(weight - scaling * (lora_B @ lora_A), settings)
            new_B, new_A = svd_factors(((weight - quantized) / scaling)[None], rank)
            lora_A, lora_B = new_A[0].to(adapter_dtype).float(), new_B[0].to(adapter_dtype).float()
        residual = weight - scaling * (lora_B @ lora_A)
        ready[name] = ModuleFactors(lora_A, lora_B, {**module.extra, RESIDUAL_KEY: residual})
    return ready
