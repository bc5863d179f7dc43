"""bitsandbytes round trips: which quantization a layer uses, `deq(Q(W))` with a layer's quantizer, writing a
quantized weight into a layer and reading back the weight it computes with.

bitsandbytes is an optional dependency: it is imported where a quantized layer or setting is actually handled, so
that full-precision use never loads it. Its parameters carry their quantization state in attributes that
`torch.nn.Parameter` does not declare (`quant_state`, `SCB`, the 4-bit settings), hence the `Any` below.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from peft.utils.integrations import get_bnb_param_type
from torch import nn

QUANT_KEYS_4BIT = ("quant_type", "blocksize", "compress_statistics", "quant_storage")


def bnb_bits(module: nn.Module) -> int | None:
    """4 or 8 for a bitsandbytes `Linear4bit` / `Linear8bitLt`, None otherwise.

    Example:
        >>> bnb_bits(torch.nn.Linear(4, 4)) is None
        True
    """
    weight = getattr(module, "weight", None)
    kind = get_bnb_param_type(weight) if isinstance(weight, nn.Parameter) else False
    return {"4bit": 4, "8bit": 8}.get(kind) if kind else None


def quantize_roundtrip(weight: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
    """`deq(Q(weight))` in fp32, with exactly the quantizer a layer with `settings` uses.

    Example:
        >>> w = torch.randn(64, 64) * 0.02
        >>> err = quantize_roundtrip(w, {"bits": 4, "quant_type": "nf4", "blocksize": 64,
        ...                               "compress_statistics": False, "quant_storage": "uint8"}) - w
        >>> float(err.norm() / w.norm()) < 0.2
        True
    """
    import bitsandbytes.functional as bnbf

    if settings["bits"] == 4:
        packed, state = bnbf.quantize_4bit(
            weight.float().contiguous(),
            blocksize=settings["blocksize"],
            compress_statistics=settings["compress_statistics"],
            quant_type=settings["quant_type"],
            quant_storage=getattr(torch, settings["quant_storage"]),
        )
        return bnbf.dequantize_4bit(packed, state).float()
    if settings["bits"] == 8:
        rows, scales, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16))
        return bnbf.int8_vectorwise_dequant(rows, scales).float()
    return weight.float()


def store_quantized(module: nn.Module, weight: torch.Tensor) -> None:
    """Replace a bnb layer's weight by `weight` (fp32), quantized with the layer's own settings (all of them).

    Example:
        >>> store_quantized(linear_4bit, residual)                    # doctest: +SKIP
    """
    import bitsandbytes as bnb

    old: Any = module.weight
    new: Any  # bnb's `Params4bit.to` / `Int8Params.to` annotations do not type-check against their own classes
    if bnb_bits(module) == 4:
        new = bnb.nn.Params4bit(
            weight.float().cpu(),
            requires_grad=False,
            module=cast("bnb.nn.Linear4bit", module),
            **{key: getattr(old, key) for key in QUANT_KEYS_4BIT},
        )
        module.weight = new.to(old.device)
    else:
        new = bnb.nn.Int8Params(weight.to(torch.float16).cpu(), requires_grad=False, has_fp16_weights=False)
        module.weight = new.to(old.device)
        layer_state: Any = module.state
        layer_state.SCB = None  # forward takes the new row scales from the new weight


def dequantize(module: nn.Module) -> torch.Tensor:
    """The fp32 weight a bitsandbytes layer computes with (`deq(Q(W))`), without modifying the layer.

    Example:
        >>> dequantize(linear_4bit).dtype                             # doctest: +SKIP
        torch.float32
    """
    import bitsandbytes.functional as bnbf

    unpack_cpu_layout(module)
    weight: Any = module.weight
    if bnb_bits(module) == 4:
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    layer_state: Any = module.state
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer_state.SCB
    return bnbf.int8_vectorwise_dequant(weight.data, scales).float()


def unpack_cpu_layout(module: nn.Module) -> None:
    """Undo bitsandbytes' CPU packed layout (AVX512-BF16 CPUs, after an eval forward) before dequantizing.

    Example:
        >>> unpack_cpu_layout(linear_4bit)                            # doctest: +SKIP
    """
    import bitsandbytes.functional as bnbf

    weight: Any = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        weight.data, weight.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(weight.data, state)
        module.quant_state = weight.quant_state
