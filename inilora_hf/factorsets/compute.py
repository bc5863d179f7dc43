"""Computing a `FactorSet` from a loaded model: targets → fp32 weights → variant → statistics."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from inilora_hf.factorsets.factor_set import FactorSet
from inilora_hf.factorsets.format import library_versions, now_iso
from inilora_hf.log import get_logger
from inilora_hf.variants import ModuleFactors, VariantInputs, get_variant
from inilora_hf.variants.config import InitConfig

from .fingerprint_memo import module_fingerprint
from .report import fit_statistics
from .targets import find_target_linears

logger = get_logger(__name__)


def default_device() -> torch.device:
    """CUDA when available (the fit is bandwidth-bound), else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_fingerprints(model: nn.Module, config: InitConfig) -> dict[str, dict]:
    """Fingerprints of the target weights as the model holds them (its own dtype)."""
    modules = find_target_linears(model, config.target_modules)
    return {name: module_fingerprint(module) for name, module in modules.items()}


def compute_factor_set(
    weights: Mapping[str, torch.Tensor],
    config: InitConfig,
    *,
    fingerprints: Mapping[str, dict],
    base_model: str | None = None,
    base_revision: str | None = None,
    device: torch.device | str | None = None,
    gradients: Mapping[str, torch.Tensor] | None = None,
    max_group_bytes: int | None = None,
    harvested: Mapping[str, ModuleFactors] | None = None,
) -> FactorSet:
    """Run `config.variant` on `weights` and package the result with statistics and provenance.

    Example:
        >>> cfg = InitConfig("pissa", rank=4, target_modules=["q_proj"])                  # doctest: +SKIP
        >>> linears = find_target_linears(model, cfg.target_modules)                       # doctest: +SKIP
        >>> weights = {n: read_weight(m) for n, m in linears.items()}                     # doctest: +SKIP
        >>> fs = compute_factor_set(weights, cfg, fingerprints=model_fingerprints(model, cfg))  # doctest: +SKIP
    """
    spec = get_variant(config.variant)
    if spec.needs_gradients and gradients is None:
        raise ValueError(
            f"Variant {spec.name!r} is data-driven: pass `calibration_data=` (a dataset or dataloader) to inilora_init."
        )
    device = torch.device(device) if device is not None else default_device()
    started = time.perf_counter()
    factors = run_variant(
        weights, config, device=device, gradients=gradients, max_group_bytes=max_group_bytes, harvested=harvested
    )
    seconds = time.perf_counter() - started
    stats = fit_statistics(weights, factors, config, device=device)
    logger.info("Computed %s factors for %d modules in %.1f s on %s.", spec.name, len(factors), seconds, device)
    return FactorSet(
        config=config,
        factors={n: factors[n] for n in sorted(factors)},
        fingerprints=dict(fingerprints),
        base_model=base_model,
        base_revision=base_revision,
        stats=stats,
        info=provenance(seconds, device),
    )


def run_variant(
    weights: Mapping[str, torch.Tensor],
    config: InitConfig,
    *,
    device: torch.device,
    gradients: Mapping[str, torch.Tensor] | None = None,
    max_group_bytes: int | None = None,
    std_by_type: Mapping[str, float] | None = None,
    harvested: Mapping[str, ModuleFactors] | None = None,
) -> dict[str, ModuleFactors]:
    """Run `config.variant` on `weights` and check that it returned `(r, in)` / `(out, r)` factors for each module.

    `std_by_type` is passed on when `weights` holds only a subset of the targets, `harvested` for PEFT's
    data-driven inits (see `VariantInputs`).

    Example:
        >>> cfg = InitConfig("pissa", rank=2, target_modules=["q_proj"])
        >>> factors = run_variant({"q_proj": torch.randn(6, 4)}, cfg, device=torch.device("cpu"))
        >>> tuple(factors["q_proj"].lora_A.shape), tuple(factors["q_proj"].lora_B.shape)
        ((2, 4), (6, 2))
    """
    spec = get_variant(config.variant)
    factors = spec.compute(
        VariantInputs(
            weights=weights,
            config=config,
            device=device,
            gradients=gradients,
            max_group_bytes=max_group_bytes,
            std_by_type=std_by_type,
            harvested=harvested,
        )
    )
    missing = sorted(set(weights) - set(factors))
    if missing:
        raise ValueError(f"Variant {spec.name!r} returned no factors for {missing[:3]}.")
    for name, module in factors.items():
        expected_A = (config.rank_for(name), weights[name].shape[1])
        expected_B = (weights[name].shape[0], config.rank_for(name))
        if tuple(module.lora_A.shape) != expected_A or tuple(module.lora_B.shape) != expected_B:
            raise ValueError(
                f"Variant {spec.name!r} returned lora_A {tuple(module.lora_A.shape)} / lora_B "
                f"{tuple(module.lora_B.shape)} for {name!r}; expected {expected_A} / {expected_B}."
            )
    return factors


def provenance(seconds: float, device: torch.device) -> dict[str, Any]:
    """The `info` of a freshly computed factor set: creation time, compute seconds and device, library versions."""
    return {
        "created_at": now_iso(),
        "compute_seconds": round(seconds, 3),
        "compute_device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "versions": library_versions(),
    }
