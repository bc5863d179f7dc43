"""PEFT's data-driven inits (`eva`, `corda`, `lora_ga`) run by PEFT itself on a copy of the model, then harvested.

`peft_data_init` deep-copies the plain base model (PEFT wraps its layers and, for CorDA and LoRA-GA, writes the
residual into them; the caller's model stays untouched) and runs PEFT's documented procedure on the calibration
batches, inside a forked RNG seeded with the variant's `seed` (0 when it has none):

* `eva`: `get_peft_model(copy, LoraConfig(init_lora_weights="eva", eva_config=...))`, then
  `initialize_lora_eva_weights(peft_model, dataloader=batches)` (forward passes, incremental SVD of layer inputs);
* `corda`: `preprocess_corda(copy, config, run_model=...)`, whose hooks need one sample per forward pass: each
  batch row is run alone, without its padding; then `get_peft_model`;
* `lora_ga`: `preprocess_loraga(copy, config, train_step=...)`, where `train_step` runs forward and backward on
  every batch (PEFT averages the gradient over the backward passes); then `get_peft_model`.

From every LoRA layer it takes A, B, the rank and alpha PEFT chose (EVA redistributes them), and checks the base
weight PEFT left against the variant's registration with `variants.peft_native.check_peft_init`: unchanged for
`eva`, `W0 − s·B·A` up to rounding for `corda` and `lora_ga`, which `inilora_hf.adapters.apply` recomputes from the
stored factors. The variant function (`variants.peft_data`) receives the factors in `VariantInputs.harvested`.

On a 4/8-bit base only `eva` runs (it reads layer inputs, so it runs on the quantized model, as with PEFT alone);
`corda` and `lora_ga` need the full-precision weights and are refused by `calibrate`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from peft import get_peft_model, initialize_lora_eva_weights, preprocess_loraga
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.corda import preprocess_corda
from torch import nn

from inilora_hf.errors import CalibrationDataError
from inilora_hf.linalg.bnb import bnb_bits
from inilora_hf.log import get_logger
from inilora_hf.variants import ModuleFactors, get_variant
from inilora_hf.variants.config import InitConfig
from inilora_hf.variants.peft_data import peft_lora_config
from inilora_hf.variants.peft_native import PeftLayerInit, check_peft_init

from .data import Batch
from .statistics import input_device, to_device

logger = get_logger(__name__)


@dataclass
class PeftDataInit:
    """What PEFT's data-driven init produced.

    Attributes:
        config: The config, with `rank_pattern` / `alpha_pattern` spelling out every module whose rank or alpha PEFT
            changed (EVA's redistribution; one full module name per key, as PEFT records them); unchanged otherwise.
        factors: Module name → A, B as PEFT initialised them (fp32, CPU).
    """

    config: InitConfig
    factors: dict[str, ModuleFactors]


def peft_data_init(
    model: nn.Module, config: InitConfig, batches: Sequence[Batch], weights: Mapping[str, torch.Tensor]
) -> PeftDataInit:
    """Run PEFT's data-driven init `config.variant` on a copy of `model` with `batches`, and harvest it.

    Args:
        model: The plain base model (not modified).
        config: An `eva`, `corda` or `lora_ga` config.
        batches: The calibration batches (`CalibrationSet.batches`); they need `labels` for `lora_ga`.
        weights: Module name → fp32 W0 of every target (what the base weight PEFT leaves is checked against).

    Raises:
        CalibrationDataError: the data cannot drive the init (too few tokens for EVA's SVD, no loss for LoRA-GA,
            or EVA assigned a module rank 0).
        PeftInitError: PEFT left a base weight other than the variant declares.

    Example:
        >>> cal = calibration_set(rows, samples=16)                                                 # doctest: +SKIP
        >>> result = peft_data_init(model, InitConfig("eva", rank=4), cal.batches, weights)       # doctest: +SKIP
        >>> result.config.rank_pattern                                                              # doctest: +SKIP
        {'model.layers.0.self_attn.q_proj': 6, 'model.layers.1.self_attn.q_proj': 2}
    """
    names = sorted(weights)
    lora_config = peft_lora_config(config, names)
    if config.variant == "eva":
        _check_eva_tokens(config, batches, names)
    work = copy.deepcopy(model)
    device = input_device(work)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(config.options.get("seed", 0)))
        if config.variant == "corda":
            preprocess_corda(work, lora_config, run_model=lambda: run_samples(work, batches))
        elif config.variant == "lora_ga":
            preprocess_loraga(work, lora_config, train_step=lambda: train_step(work, batches))
        peft_model = get_peft_model(work, lora_config)
        if config.variant == "eva":
            # PEFT takes plain dicts only (a collator's BatchEncoding is a UserDict)
            initialize_lora_eva_weights(peft_model, dataloader=[dict(b) for b in batches], show_progress_bar=False)
    result = _harvest(peft_model.get_base_model(), config, weights)
    logger.info("PEFT's %s init computed on %d calibration batches.", config.variant, len(batches))
    return result


def run_samples(model: nn.Module, batches: Sequence[Batch]) -> None:
    """Forward every sample of `batches` alone, without its padding (`attention_mask == 0`) and without labels:
    CorDA's covariance hooks in PEFT take one sample per forward pass.

    Example:
        >>> preprocess_corda(model, lora_config, run_model=lambda: run_samples(model, cal.batches))  # doctest: +SKIP
    """
    device = input_device(model)
    for batch in batches:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        for row in range(ids.shape[0]):
            keep = mask[row].bool() if mask is not None else torch.ones(ids.shape[1], dtype=torch.bool)
            sample = {
                key: value[row : row + 1][:, keep]
                for key, value in batch.items()
                if key != "labels" and torch.is_tensor(value) and tuple(value.shape[:2]) == tuple(ids.shape[:2])
            }
            model(**to_device(sample, device))


def train_step(model: nn.Module, batches: Sequence[Batch]) -> None:
    """Forward and backward of the model's own loss on every batch (gradients accumulate in the weights' `.grad`,
    which `preprocess_loraga` averages over the backward passes).

    Example:
        >>> preprocess_loraga(model, lora_config, train_step=lambda: train_step(model, cal.batches))  # doctest: +SKIP
    """
    device = input_device(model)
    for index, batch in enumerate(batches):
        loss = getattr(model(**to_device(batch, device)), "loss", None)
        if loss is None:
            raise CalibrationDataError(
                f"The model returned no loss for calibration batch {index}: LoRA-GA needs `labels` in the batches "
                "(the default collator adds them; a custom collate_fn or DataLoader must too)."
            )
        loss.backward()


def _check_eva_tokens(config: InitConfig, batches: Sequence[Batch], names: Sequence[str]) -> None:
    """EVA's SVD hooks skip a batch with fewer tokens than components and PEFT then loops over the data forever;
    its label mask broadcasts one label per sample against the tokens: refuse such data up front."""
    options = config.options
    components = max(round(config.rank_for(name) * options["rho"]) for name in names)
    for index, batch in enumerate(batches):
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        if options["use_label_mask"] and "labels" in batch:
            if tuple(batch["labels"].shape) != tuple(mask.shape):
                raise CalibrationDataError(
                    f"EVA's use_label_mask=True masks token labels, but calibration batch {index} has labels of shape "
                    f"{tuple(batch['labels'].shape)} for input_ids {tuple(mask.shape)} (one label per sample?): pass "
                    "use_label_mask=False."
                )
            mask = mask & (batch["labels"] != options["label_mask_value"])
        tokens = int(mask.sum())
        if tokens < components:
            raise CalibrationDataError(
                f"EVA needs at least rank·rho = {components} tokens in every calibration batch, batch {index} has "
                f"{tokens}: pass a larger `calibration_batch_size` (or longer samples), or a smaller rank or `rho`."
            )


def _harvest(model: nn.Module, config: InitConfig, weights: Mapping[str, torch.Tensor]) -> PeftDataInit:
    """A, B, ranks and alphas of `model`'s LoRA layers, each full-precision one checked against the variant's
    declaration (its base weight compared with W0)."""
    spec = get_variant(config.variant)
    factors: dict[str, ModuleFactors] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for name in sorted(weights):
        layer = model.get_submodule(name)
        if not isinstance(layer, LoraLayer):
            raise CalibrationDataError(
                f"EVA assigned rank 0 to {name!r} (PEFT then drops its adapter), which a factor set cannot hold: pass "
                "rho=1.0 (no rank redistribution), or leave the module out of target_modules."
            )
        base_layer = cast(nn.Linear, layer.get_base_layer())
        base = base_layer.weight.detach()
        result = PeftLayerInit(
            lora_A=_factor(layer, "lora_A"),
            lora_B=_factor(layer, "lora_B"),
            base_weight=base.float().cpu(),
            frozen=tuple(layer.frozen_peft_weight_names.get("default", ())),
        )
        if bnb_bits(base_layer) is None:
            check_peft_init(name, weights[name], result, spec, layer.scaling["default"], storage_dtype=base.dtype)
        # A 4/8-bit copy (EVA only) is not compared: bitsandbytes' CPU forward repacks the 4-bit data, after which
        # it no longer dequantizes to W0's values. The model trains on a fresh load that PEFT never touched.
        factors[name] = ModuleFactors(result.lora_A, result.lora_B)
        ranks[name] = int(layer.r["default"])
        alphas[name] = float(layer.lora_alpha["default"])
    if all(config.rank_for(n) == ranks[n] and config.alpha_for(n) == alphas[n] for n in ranks):
        return PeftDataInit(config, factors)
    default_alpha = cast(float, config.lora_alpha)
    patterns: dict[str, Any] = {
        "rank_pattern": {n: r for n, r in ranks.items() if r != config.rank},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != default_alpha},
    }
    logger.info("PEFT's %s chose per-module ranks %s.", config.variant, sorted(set(ranks.values())))
    return PeftDataInit(dataclasses.replace(config, **patterns), factors)


def _factor(layer: LoraLayer, which: str) -> torch.Tensor:
    return cast(nn.Linear, getattr(layer, which)["default"]).weight.detach().float().cpu().contiguous()
