"""The merged form of a trained model: its plain `transformers` state dict with every LoRA target weight
`R + s·B·A` (fp32, cast once), and the weightless model of the base's own class that saves it."""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils.integrations import get_bnb_param_type
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_utils import set_zero3_state

from inilora_hf.adapters.layers import adapter_linear
from inilora_hf.adapters.loraxs import folded_lora_B, is_loraxs
from inilora_hf.factorsets.targets import read_weight, to_layout
from inilora_hf.training.init_metadata import model_dtype

from .trained import require_peft


def merged_state_dict(
    model: PeftModel, *, dtype: torch.dtype | None = None, adapter_name: str | None = None
) -> dict[str, torch.Tensor]:
    """The plain model's state dict with `adapter_name` merged: target weights `R + s·B·A` (fp32, cast once).

    Keys are those of the plain transformers model (`model.layers.0.self_attn.q_proj.weight`); tensors that
    need no change are shared with `model` (not copied) unless `dtype` casts them. `modules_to_save` copies
    of the adapter replace the original modules.

    Example:
        >>> state = merged_state_dict(trained_model, dtype=torch.bfloat16)        # doctest: +SKIP
    """
    peft_model = require_peft(model)
    adapter = adapter_name or peft_model.active_adapter
    base = peft_model.get_base_model()
    out_dtype = dtype or model_dtype(base)
    lora_layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    wrappers = {name: m for name, m in base.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)}
    # Quantized layers outside LoRA (LoRA layers forward `.weight` to their quantized base layer: skip them too).
    quantized = {
        name: m
        for name, m in base.named_modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor)
        and get_bnb_param_type(m.weight)
        and not any(name == owner or name.startswith(f"{owner}.") for owner in lora_layers)
    }
    source = base.state_dict()
    shared = _storage_groups(source)
    state: dict[str, torch.Tensor] = {}
    for name, layer in sorted(lora_layers.items()):
        key = f"{name}.weight"
        if len(shared.get(f"{name}.base_layer.weight", ())) > 1:
            raise ValueError(
                f"LoRA module {name!r} targets a weight tied to another one (e.g. lm_head and the input "
                "embeddings); a merged checkpoint cannot represent it. Untie the weights before training, or "
                "export with `to_lora` instead."
            )
        state[key] = _merged_weight(layer, adapter, name).to(out_dtype)
    for name, module in sorted(quantized.items()):
        state[f"{name}.weight"] = read_weight(module).to(out_dtype)
    cast: dict[str, torch.Tensor] = {}  # tied tensors stay tied after the cast
    for key, tensor in source.items():
        plain = _plain_key(key, lora_layers, wrappers, set(quantized), adapter)
        if plain is None or plain in state:
            continue
        if dtype is not None and tensor.is_floating_point():
            root = shared.get(key, (key,))[0]
            if root not in cast:
                cast[root] = tensor.to(dtype)
            tensor = cast[root]
        state[plain] = tensor
    return state


def plain_skeleton(base: nn.Module, dtype: torch.dtype, inference_config: dict[str, Any]) -> PreTrainedModel:
    """A weightless (meta-device) instance of the base model's own class, to save the merged state with.

    Saving through it (rather than the PEFT-wrapped base) writes the plain class name, dtype and weight
    conversions without touching the caller's model or its config. `inference_config` holds the values the
    base had before a trainer switched them for training (`apply.TRAINING_SWITCHES`).

    Example:
        >>> skeleton = plain_skeleton(base, torch.bfloat16, {"use_cache": True})   # doctest: +SKIP
    """
    config = copy.deepcopy(base.config)
    for name, value in inference_config.items():
        setattr(config, name, value)
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if attribute in config.__dict__:
            delattr(config, attribute)
    model_class = cast(type[PreTrainedModel], type(base))  # a transformers model: only those have `_from_config`
    # set_zero3_state: transformers' switch that skips `deepspeed.zero.Init` (under ZeRO-3 only rank 0 builds the
    # skeleton, and zero.Init's collectives would wait for the other ranks).
    with torch.device("meta"), set_zero3_state():
        skeleton = model_class._from_config(config, dtype=dtype)
    if getattr(base, "generation_config", None) is not None:
        skeleton.generation_config = copy.deepcopy(base.generation_config)
    return skeleton


def check_keys(state: dict[str, torch.Tensor], skeleton: nn.Module) -> None:
    """Raise a `ValueError` unless `state` has exactly the keys of `skeleton`'s state dict.

    Example:
        >>> check_keys(merged_state_dict(peft_model), skeleton)                  # doctest: +SKIP
    """
    expected = set(skeleton.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"The merged weights do not match {type(skeleton).__name__}'s parameters (missing: {missing[:3]}, "
            f"unexpected: {unexpected[:3]}). The PEFT model holds something the merged export does not handle; "
            "export with `to_lora` instead."
        )


def _merged_weight(layer: LoraLayer, adapter: str, name: str) -> torch.Tensor:
    """`W + s·B·A` of one LoRA layer in fp32, in the base layer's layout: `(out, in)`, or `(in, out)` for Conv1D."""
    if adapter not in layer.lora_A:
        raise ValueError(f"LoRA module {name!r} has no adapter {adapter!r} (it has {sorted(layer.lora_A)}).")
    other_variant = layer.lora_variant.get(adapter) is not None and not is_loraxs(layer, adapter)
    if layer.use_dora.get(adapter) or layer.lora_bias.get(adapter) or other_variant:
        raise ValueError(
            f"LoRA module {name!r} uses DoRA, a LoRA bias or another LoRA variant; only plain LoRA is converted. "
            "Train without `use_dora`/`lora_bias`."
        )
    if getattr(layer, "merged", False):
        raise ValueError(f"LoRA module {name!r} is merged into its base weight; call `model.unmerge_adapter()` first.")
    lora_A = adapter_linear(layer, "lora_A", adapter).weight.detach().float()
    lora_B = folded_lora_B(layer, adapter)  # B, or B·R for LoRA-XS
    delta = layer.scaling[adapter] * (lora_B @ lora_A.to(lora_B.device))
    base = layer.get_base_layer()  # a Linear (bitsandbytes' included), or a Conv1D whose weight is stored in × out
    weight = read_weight(base)  # (out, in)
    return to_layout(base, weight + delta.to(weight.device)).contiguous().cpu()


def _plain_key(
    key: str, lora_layers: dict[str, Any], wrappers: dict[str, Any], quantized: set[str], adapter: str
) -> str | None:
    """Map a state-dict key of the PEFT-wrapped base model to the plain model's key (None: not saved)."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        owner, rest = ".".join(parts[:cut]), parts[cut:]
        if owner in lora_layers:
            # Of the base layer only the bias carries over: the weight is merged separately, and anything else is
            # quantization state (4-bit `weight.absmax`..., 8-bit `SCB`, `weight_format`); LoRA factors are dropped.
            return f"{owner}.bias" if rest == ["base_layer", "bias"] else None
        if owner in wrappers:
            wrapper = wrappers[owner]
            if not isinstance(wrapper, ModulesToSaveWrapper):
                raise ValueError(
                    f"Module {owner!r} is wrapped by PEFT's {type(wrapper).__name__}, which the merged export does "
                    "not support. Train without `trainable_token_indices`."
                )
            has_copy = adapter in wrapper.modules_to_save
            if rest[0] == "original_module" and not has_copy:
                return ".".join([owner, *rest[1:]])
            if rest[0] == "modules_to_save" and rest[1] == adapter:
                return ".".join([owner, *rest[2:]])
            return None
        if owner in quantized:
            return key if rest == ["bias"] else None  # the weight is dequantized separately
    return key


def _storage_groups(state: dict[str, torch.Tensor]) -> dict[str, tuple[str, ...]]:
    """key → all keys sharing its storage (tied weights), each group sorted."""
    groups: dict[tuple, list[str]] = {}
    for key, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            ident = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            groups.setdefault(ident, []).append(key)
    return {key: tuple(sorted(keys)) for keys in groups.values() for key in keys}
