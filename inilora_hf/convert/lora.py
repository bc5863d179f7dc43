"""The standard-LoRA form of a trained model: PEFT's adapter tensors and `LoraConfig`, relative to the original base.

Residual variants get rank 2r per module (`A' = [A; A0]`, `B' = [B, −B0]`, alpha scaled so `s` is unchanged); LoRA-XS
cores are folded into B; the task type and, for a task that only now gets one, the task head are recorded."""

from __future__ import annotations

import copy
import math

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from peft.utils.other import AuxiliaryTrainingWrapper, get_pattern_key

from inilora_hf.adapters.loraxs import fold_cores, initial_lora_B
from inilora_hf.adapters.tasks import task_classes
from inilora_hf.factorsets.factor_set import FactorSet
from inilora_hf.training.init_metadata import trained_base
from inilora_hf.variants import get_variant

from .trained import require_factor_set, require_peft


def standard_lora(model: PeftModel, *, adapter_name: str | None = None) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """The tensors (PEFT's saved-key layout) and `LoraConfig` of the standard adapter `to_lora` writes.

    Example:
        >>> state, config = standard_lora(trained_model)                          # doctest: +SKIP
        >>> config.r, config.init_lora_weights                                   # doctest: +SKIP
        (16, True)
    """
    peft_model = require_peft(model)
    factor_set = require_factor_set(peft_model)
    adapter = adapter_name or peft_model.active_adapter
    config = copy.deepcopy(peft_model.peft_config[adapter])
    if not isinstance(config, LoraConfig):
        raise TypeError(f"Adapter {adapter!r} is a {type(config).__name__}, not a LoRA adapter.")
    state = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(peft_model, adapter_name=adapter).items()}
    fold_cores(state, peft_model, adapter_name=adapter)  # LoRA-XS: B' = B·R, the core dropped (rank r)
    if get_variant(factor_set.config.variant).residual:
        _append_initial_factors(state, config, factor_set)
    config.init_lora_weights = True
    config.inference_mode = True
    config.base_model_name_or_path, config.revision = trained_base(peft_model)
    if config.task_type is None:
        config.task_type = task_classes(peft_model.get_base_model(), None).task_type
        _add_task_heads(state, peft_model, config.task_type)
    return state, config


# Head modules that `PeftModelFor<task>` wraps as `modules_to_save` when it loads an adapter of that task type, and
# whose weights it then requires in the adapter file (peft/peft_model.py: `classifier_module_names`, `qa_module_names`).
_TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def _add_task_heads(state: dict[str, torch.Tensor], model: PeftModel, task_type: str | None) -> None:
    """Put the task head's current weights (frozen during training, or randomly initialised when the base checkpoint
    has none) into an adapter that gets the task type only now, as PEFT's loader for that task expects them."""
    heads = _TASK_HEADS.get(task_type or "", ())
    for name, module in model.get_base_model().named_modules():
        if name.endswith(heads) and not isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)):
            for key, tensor in module.state_dict().items():
                state.setdefault(f"base_model.model.{name}.{key}", tensor.detach().cpu())


def _append_initial_factors(state: dict[str, torch.Tensor], config: LoraConfig, factor_set: FactorSet) -> None:
    """Rank 2r per module: `A' = [A; A0]`, `B' = [B, −B0]`, so `s·B'A' = s·(BA − B0A0)` on top of `W0`; every rank
    (`r` and `rank_pattern`) is doubled and every alpha (`lora_alpha` and `alpha_pattern`) scaled so that each
    module keeps its scaling."""
    rank_pattern, alpha_pattern = config.rank_pattern or {}, config.alpha_pattern or {}
    for name, initial in sorted(factor_set.factors.items()):
        rank = rank_pattern.get(get_pattern_key(list(rank_pattern), name), config.r)
        alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), name), config.lora_alpha)
        if not math.isclose(_scaling(rank, alpha, config.use_rslora), factor_set.config.scaling_for(name)):
            raise ValueError(
                f"The adapter's scaling of {name!r} ({alpha}/{rank}, rslora={config.use_rslora}) differs from the "
                f"factor set's ({factor_set.config.scaling_for(name)}); it was not trained from this factor set."
            )
        key = f"base_model.model.{name}"
        try:
            lora_A, lora_B = state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"]
        except KeyError:
            raise ValueError(
                f"The adapter has no LoRA weights for {name!r}, which the factor set initialised; it was not "
                "trained from this factor set."
            ) from None
        # fp32: R was computed from the fp32 factors, so A0/B0 must not be rounded to a lower adapter dtype.
        state[f"{key}.lora_A.weight"] = torch.cat([lora_A.float(), initial.lora_A.float().cpu()], dim=0)
        initial_B = initial_lora_B(initial.lora_B, initial.extra).cpu()  # B0·R0 for LoRA-XS factors
        state[f"{key}.lora_B.weight"] = torch.cat([lora_B.float(), -initial_B], dim=1)
    # PEFT annotates `LoraConfig.lora_alpha: int`, but uses it as any number (`scaling = lora_alpha / r`).
    factor = math.sqrt(2) if config.use_rslora else 2
    config.lora_alpha = config.lora_alpha * factor  # type: ignore[assignment]
    config.alpha_pattern = {key: alpha * factor for key, alpha in alpha_pattern.items()}
    config.r = 2 * config.r
    config.rank_pattern = {key: 2 * rank for key, rank in rank_pattern.items()}


def _scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if use_rslora else rank)
