"""Writing a `FactorSet` into a PEFT LoRA model: A, B, and for residual variants the base weight R."""

from __future__ import annotations

from typing import Any, cast

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.integrations import gather_params_ctx
from torch import nn

from inilora_hf.factorsets.checkpoint_files import model_reference
from inilora_hf.factorsets.factor_set import FactorSet
from inilora_hf.factorsets.format import RESIDUAL_KEY
from inilora_hf.factorsets.lora_config import lora_config_for
from inilora_hf.factorsets.report import InitReport, ModuleReport
from inilora_hf.factorsets.targets import read_weight, to_layout
from inilora_hf.linalg.bnb import bnb_bits, store_quantized
from inilora_hf.log import get_logger
from inilora_hf.variants import get_variant

from .layers import adapter_linear, freeze_adapter_weights
from .loraxs import CORE_KEY, attach_core, count_core_parameters
from .quantized import fidelity, layer_settings

logger = get_logger(__name__)

# Warn when the quantized init is this many times further from W0 than plain QLoRA's Q(W0).
QUANTIZED_WARN_RATIO = 2.0

# Config switches that trainers flip for training (`Trainer.__init__` sets `use_cache = args.use_cache`, False by
# default); exports restore the base model's values, recorded by `wrap_with_factors` before any trainer ran.
TRAINING_SWITCHES = ("use_cache",)


def wrap_with_factors(
    model: nn.Module,
    factor_set: FactorSet,
    *,
    adapter_name: str = "default",
    source: str = "",
    revision: str | None = None,
    **lora_kwargs: Any,
) -> PeftModel:
    """`get_peft_model` + `apply_factor_set`; the returned model carries `.factor_set`, `.init_report` and
    `.base_inference_config` (the base's `TRAINING_SWITCHES` values before any trainer changed them).

    The adapter config records the base actually wrapped: `base_model_name_or_path` is the model's own
    `name_or_path` with a local directory made absolute (a Hub id stays as is), and `revision` the revision it
    was loaded at, so that every saved adapter and export names a base that loads from any working directory.

    Example:
        >>> model = wrap_with_factors(AutoModelForCausalLM.from_pretrained("./base"), factor_set)   # doctest: +SKIP
        >>> model.peft_config["default"].base_model_name_or_path                                      # doctest: +SKIP
        '/home/me/base'
    """
    config = getattr(model, "config", None)
    inference_config = {name: getattr(config, name) for name in TRAINING_SWITCHES if hasattr(config, name)}
    peft_model = get_peft_model(
        model, lora_config_for(factor_set, **lora_kwargs), adapter_name=adapter_name, revision=revision
    )
    peft_config = peft_model.peft_config[adapter_name]
    if peft_config.base_model_name_or_path:
        peft_config.base_model_name_or_path = model_reference(peft_config.base_model_name_or_path)
    report = apply_factor_set(peft_model, factor_set, adapter_name=adapter_name, source=source)
    carrier: Any = peft_model  # plain attributes, which nn.Module's `__getattr__` would type as `Tensor | Module`
    carrier.factor_set = factor_set
    carrier.init_report = report
    carrier.base_inference_config = inference_config
    return peft_model


@torch.no_grad()
def apply_factor_set(
    peft_model: PeftModel, factor_set: FactorSet, *, adapter_name: str = "default", source: str = ""
) -> InitReport:
    """Overwrite the LoRA factors of `adapter_name` with `factor_set` and, for residual variants, replace each
    base weight by `R = W0 − s·B·A` computed in fp32 from the factors *as stored* (after casting to the
    adapter dtype), then cast once to the base dtype. Returns the per-module `InitReport`.

    Example:
        >>> peft_model = get_peft_model(model, lora_config_for(fs))              # doctest: +SKIP
        >>> report = apply_factor_set(peft_model, fs)                           # doctest: +SKIP
        >>> report.max_reconstruction_error < 1e-5                             # doctest: +SKIP
        True
    """
    spec = get_variant(factor_set.config.variant)
    report = InitReport(
        variant=spec.name,
        rank=factor_set.config.rank,
        scaling=factor_set.config.scaling,
        residual=spec.residual,
        source=source,
    )
    layers = {
        name: module
        for name, module in peft_model.get_base_model().named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A
    }
    missing = sorted(set(factor_set.factors) - set(layers))
    if missing:
        raise ValueError(f"The PEFT model has no LoRA layer for {missing[:3]} (adapter {adapter_name!r}).")
    for name in sorted(factor_set.factors):
        report.modules.append(_apply_module(layers[name], factor_set, name, adapter_name, spec.residual))
        if spec.frozen_factors:
            freeze_adapter_weights(layers[name], adapter_name, spec.frozen_factors)
    logger.info("LoRA init applied (%s):\n%s", source or spec.name, report.summary())
    if spec.frozen_factors:
        logger.info("%s: %s stay(s) frozen during training.", spec.name, " and ".join(spec.frozen_factors))
    cores, core_parameters = count_core_parameters(peft_model, adapter_name=adapter_name)
    if cores:
        logger.info(
            "LoRA-XS: only the r×r cores train: %d modules × r² = %d trainable parameters (A and B frozen).",
            cores,
            core_parameters,
        )
    return report


def _apply_module(
    layer: LoraLayer, factor_set: FactorSet, name: str, adapter_name: str, residual: bool
) -> ModuleReport:
    factors = factor_set.factors[name]
    scaling = layer.scaling[adapter_name]
    expected = factor_set.config.scaling_for(name)
    if abs(scaling - expected) > 1e-12 * max(1.0, scaling):
        raise ValueError(f"LoRA scaling of {name!r} is {scaling}, but the factor set was computed for {expected}.")
    base = cast(nn.Linear, layer.get_base_layer())  # a Linear (bitsandbytes' included) or a Conv1D, stored in × out
    lora_A = adapter_linear(layer, "lora_A", adapter_name).weight
    lora_B = adapter_linear(layer, "lora_B", adapter_name).weight
    if tuple(factors.lora_A.shape) != tuple(lora_A.shape) or tuple(factors.lora_B.shape) != tuple(lora_B.shape):
        raise ValueError(
            f"Factor shapes of {name!r} (A {tuple(factors.lora_A.shape)}, B {tuple(factors.lora_B.shape)}) do not fit "
            f"the LoRA layer (A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)})."
        )
    quantized = bnb_bits(base) is not None and residual
    if quantized and RESIDUAL_KEY not in factors.extra:
        raise ValueError(
            f"{name!r} is a {bnb_bits(base)}-bit layer, but the factor set stores no residual. Build it through "
            "inilora_init(..., quantization_config=...) or a factor set pushed with include_residual=True."
        )
    quantization = factor_set.config.quantization
    adapter_dtype = getattr(torch, quantization["adapter_dtype"]) if bnb_bits(base) and quantization else None
    with gather_params_ctx(base.weight):
        # copy=True: the LoRA parameters must not share storage with the factor set (training would write into A0/B0)
        lora_A.data = factors.lora_A.to(
            device=lora_A.device, dtype=adapter_dtype or lora_A.dtype, copy=True
        ).contiguous()
        lora_B.data = factors.lora_B.to(
            device=lora_B.device, dtype=adapter_dtype or lora_B.dtype, copy=True
        ).contiguous()
        folded_B, fp32_A = lora_B.float(), lora_A.float()
        if CORE_KEY in factors.extra:  # LoRA-XS: s·B·R·A, only R trains
            folded_B = folded_B @ attach_core(layer, adapter_name, factors.extra[CORE_KEY]).weight.float()
        if quantized:
            residual_fp32 = factors.extra[RESIDUAL_KEY].to(folded_B.device, torch.float32)
            # W0 as recorded: R came from these factors
            weight = torch.addmm(residual_fp32, folded_B, fp32_A, alpha=scaling)
            store_quantized(base, residual_fp32)
            stored_weight = read_weight(base)
            max_abs, rel = _reconstruction_error(weight, folded_B, fp32_A, scaling, stored=stored_weight)
        else:
            # W0 (in its storage dtype) as (out, in): a transposed view for Conv1D, whose R is written back in × out
            weight = read_weight(base) if bnb_bits(base) else to_layout(base, base.weight.detach())
            if not residual:
                max_abs, rel = _reconstruction_error(weight, folded_B, fp32_A, scaling, stored=weight)
            elif RESIDUAL_KEY in factors.extra:
                stored_residual = factors.extra[RESIDUAL_KEY].to(weight.device, base.weight.dtype)
                base.weight.data = to_layout(base, stored_residual).contiguous()
                max_abs, rel = _reconstruction_error(
                    weight, folded_B, fp32_A, scaling, stored=to_layout(base, base.weight.detach())
                )
            else:
                residual_weight = torch.empty_like(base.weight)
                max_abs, rel = _reconstruction_error(
                    weight, folded_B, fp32_A, scaling, stored=to_layout(base, residual_weight), write_residual=True
                )
                base.weight.data = residual_weight
    report = ModuleReport(
        name=name,
        shape=(weight.shape[0], weight.shape[1]),
        rank=int(lora_A.shape[0]),
        scaling=float(scaling),
        storage_dtype=f"bnb-{bnb_bits(base)}bit" if bnb_bits(base) else str(base.weight.dtype).removeprefix("torch."),
        mse=factor_set.stats.get(name, {}).get("mse"),
        optimal_mse=factor_set.stats.get(name, {}).get("optimal_mse"),
        mse_ratio=factor_set.stats.get(name, {}).get("mse_ratio"),
        reconstruction_max_abs=max_abs,
        reconstruction_rel=rel,
    )
    if quantized:
        settings = factor_set.config.quantization or layer_settings(base)
        quality = fidelity(weight, stored_weight, scaling * (folded_B @ fp32_A), settings)
        report.quantized_init_error, report.qlora_error = quality.init_error, quality.qlora_error
        if quality.ratio > QUANTIZED_WARN_RATIO:
            logger.warning(
                "%s: the quantized init is %.1f× further from W0 than plain QLoRA (‖Q(R) + s·B·A − W0‖/‖W0‖ = %.3g vs "
                "‖Q(W0) − W0‖/‖W0‖ = %.3g). Consider refine_steps>0, a smaller init scale, or a full-precision base.",
                name,
                quality.ratio,
                quality.init_error,
                quality.qlora_error,
            )
    return report


#: Rows per block in `_reconstruction_error`: about 1 MiB of fp32 per operand, so each block stays in cache.
BLOCK_ELEMENTS = 1 << 18


def _reconstruction_error(
    weight: torch.Tensor,
    folded_B: torch.Tensor,
    fp32_A: torch.Tensor,
    scaling: float,
    *,
    stored: torch.Tensor,
    write_residual: bool = False,
) -> tuple[float, float]:
    """max|R + s·B·A − W0| and ‖R + s·B·A − W0‖ / ‖W0‖ in fp32, with R the base weight as `stored` (any dtype).

    With `write_residual`, `stored` is an empty tensor of the storage dtype: R = W0 − s·B·A is written into it
    first, block by block, and measured as stored. Working a block of rows at a time reads W0 and R once and never
    materialises a d×k delta or error matrix.
    """
    max_abs = torch.zeros((), dtype=torch.float32, device=weight.device)
    error_sq = torch.zeros((), dtype=torch.float64, device=weight.device)
    weight_sq = torch.zeros((), dtype=torch.float64, device=weight.device)
    step = max(1, BLOCK_ELEMENTS // weight.shape[1])
    for start in range(0, weight.shape[0], step):
        rows = slice(start, start + step)
        w0 = weight[rows].float()
        if write_residual:
            stored[rows] = torch.addmm(w0, folded_B[rows], fp32_A, alpha=-scaling)
        error = torch.addmm(stored[rows].float(), folded_B[rows], fp32_A, alpha=scaling).sub_(w0)
        low, high = torch.aminmax(error)  # (ord=inf norms are several times slower on CPU)
        max_abs = torch.maximum(max_abs, torch.maximum(-low, high))
        error_sq += torch.dot(error.view(-1), error.view(-1)).double()
        weight_sq += torch.dot(w0.reshape(-1), w0.reshape(-1)).double()
    return float(max_abs), float(error_sq.sqrt() / weight_sq.sqrt().clamp_min(1e-30))
