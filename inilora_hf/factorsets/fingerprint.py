"""Base-weight fingerprints: an exact content hash, plus a small sketch that survives dtype rounding; the cache
key built from them.

The hash identifies the exact tensor (it keys the cache). The sketch, `uᵢᵀ·W·vᵢ` for 16 fixed random
probe pairs, lets a factor set computed from fp32 weights be applied to the same checkpoint loaded in
bf16/fp16 (relative sketch difference ~1e-3), while a different weight differs by ~1.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from inilora_hf.variants.config import InitConfig

SKETCH_PROBES = 16
SKETCH_TOLERANCE = 2e-2


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes in its own dtype (CPU, contiguous)."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


def weight_sketch(weight: torch.Tensor) -> list[float]:
    """`[uᵢᵀ W vᵢ / (‖uᵢ‖‖vᵢ‖)]` for fixed seeded Gaussian probes, computed in fp32."""
    out_features, in_features = weight.shape
    generator = torch.Generator().manual_seed(out_features * 1_000_003 + in_features)
    left = torch.randn(SKETCH_PROBES, out_features, generator=generator)
    right = torch.randn(in_features, SKETCH_PROBES, generator=generator)
    projected = left.to(weight.device) @ weight.float() @ right.to(weight.device)
    norms = left.norm(dim=1) * right.norm(dim=0)
    return (projected.diagonal().cpu() / norms).tolist()


def weight_fingerprint(weight: torch.Tensor, layout: str | None = None) -> dict[str, Any]:
    """The fingerprint recorded per target module in a factor set, of the weight as stored (its own shape and
    dtype). `layout` names a storage layout other than a Linear's `out × in` (`"conv1d"`: `in × out`); it is
    recorded so that factors are never applied to a layer of the other layout (whose weight is the transpose).

    Example:
        >>> fp = weight_fingerprint(torch.eye(4))
        >>> sorted(fp), weight_fingerprint(torch.eye(4), layout="conv1d")["layout"]
        (['dtype', 'sha256', 'shape', 'sketch'], 'conv1d')
    """
    fingerprint = {
        "shape": list(weight.shape),
        "dtype": str(weight.dtype).removeprefix("torch."),
        "sha256": tensor_sha256(weight),
        "sketch": weight_sketch(weight),
    }
    if layout is not None:
        fingerprint["layout"] = layout
    return fingerprint


def out_in_shape(fingerprint: dict[str, Any]) -> list[int]:
    """The recorded weight's `(out, in)` shape (a Conv1D's is stored reversed), as fit tables show it.

    Example:
        >>> out_in_shape(weight_fingerprint(torch.zeros(4, 6), layout="conv1d"))
        [6, 4]
    """
    shape = list(fingerprint.get("shape", []))
    return shape[::-1] if fingerprint.get("layout") is not None else shape


def layout_name(fingerprint: dict[str, Any]) -> str:
    """The storage layout a fingerprint records, in words."""
    layout = fingerprint.get("layout")
    return "a Linear (weight out × in)" if layout is None else f"a {layout} layer (weight in × out)"


def fingerprint_difference(recorded: dict[str, Any], current: dict[str, Any]) -> str | None:
    """None when `current` describes the same weight as `recorded` (exactly, or up to dtype rounding);
    otherwise a short description of the difference for an error message."""
    if recorded.get("layout") != current.get("layout"):
        return f"the layout of {layout_name(current)}, but the factor set was computed for {layout_name(recorded)}"
    if list(recorded["shape"]) != list(current["shape"]):
        return f"shape {tuple(current['shape'])} but the factor set expects {tuple(recorded['shape'])}"
    if recorded["sha256"] == current["sha256"]:
        return None
    ref = torch.tensor(recorded["sketch"])
    diff = (torch.tensor(current["sketch"]) - ref).norm() / ref.norm().clamp_min(1e-30)
    if diff <= SKETCH_TOLERANCE:
        return None
    return f"different weights (sketch differs by {diff.item():.3g} relative, tolerance {SKETCH_TOLERANCE})"


def model_key(fingerprints: dict[str, dict[str, Any]]) -> str:
    """A 16-hex-digit digest of the exact target weights (the base-model half of a cache key)."""
    digest = hashlib.sha256()
    for name in sorted(fingerprints):
        layout = fingerprints[name].get("layout")
        digest.update(f"{name}:{fingerprints[name]['sha256']}{'' if layout is None else ':' + layout};".encode())
    return digest.hexdigest()[:16]


def cache_key(base_key: str, config: InitConfig) -> str:
    """Cache entry name: variant, rank, base-weight digest (`model_key`) and config hash (readable and
    collision-safe).

    Example:
        >>> cache_key("0123456789abcdef", InitConfig(variant="pissa", rank=4))[:26]
        'pissa-r4-0123456789abcdef-'
    """
    return f"{config.variant}-r{config.rank}-{base_key}-{config.config_hash()}"
