"""Turning a trained model into checkpoints that plain `transformers` / `peft` load correctly.

A residual variant (`inilora`, `pissa`, ...) trains on top of `R = W0 − s·B0·A0`, not `W0`, and PEFT never
saves base weights: the raw adapter of such a run, loaded on the original base model, silently computes
`W0 + s·B·A` instead of the trained `R + s·B·A`. This module writes the two portable forms:

* `to_merged`: a dense checkpoint with `W = R + s·B·A` (= `W0 + s·(B·A − B0·A0)`), computed in fp32 and
  cast once; loads with `AutoModelForCausalLM.from_pretrained` alone.
* `to_lora`: a standard LoRA adapter *relative to the original base*: rank 2r with `A' = [A; A0]`,
  `B' = [B, −B0]` and alpha scaled so `s` is unchanged, so that `s·B'·A' = s·(B·A − B0·A0)`; loads with
  `PeftModel.from_pretrained(original_base, dir)`. Non-residual variants keep their rank-r adapter.

Both load from any working directory with the `Auto…` classes alone: the adapter records the task type of the
base model's class (`CAUSAL_LM`, `SEQ_CLS`, ...) and the base actually trained on (a Hub id, or a local
directory's absolute path), so `AutoPeftModelForCausalLM.from_pretrained(dir)` finds it; the merged checkpoint
keeps the base's inference settings (`use_cache`), not the trainer's. Each gets a README.md model card.

Both accept a trained `PeftModel` built by `inilora_init` (or `inilora_hf.load_trained`), or the path of a
checkpoint directory written during training (`out/checkpoint-500`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData, save_torch_state_dict
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from peft.utils.integrations import get_bnb_param_type
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from torch import nn

from inilora_hf.adapters.loraxs import (
    fold_cores,
    folded_lora_B,
    initial_lora_B,
    is_loraxs,
)
from inilora_hf.adapters.tasks import task_classes
from inilora_hf.factorsets.factor_set import FactorSet
from inilora_hf.factorsets.targets import read_weight
from inilora_hf.hub.transport import is_hub_id
from inilora_hf.log import get_logger
from inilora_hf.training.checkpoint import (
    CARD_NAME,
    load_trained,
    model_dtype,
    trained_base,
)
from inilora_hf.variants import get_variant

logger = get_logger(__name__)

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"

ModelOrCheckpoint = PeftModel | str | os.PathLike


def to_merged(
    model: ModelOrCheckpoint,
    output_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    tokenizer: Any = None,
    adapter_name: str | None = None,
    base_model: str | os.PathLike | nn.Module | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Write a plain `transformers` checkpoint of the trained model (LoRA merged into the base weights).

    Every target weight becomes `R + s·B·A` computed in fp32 from the model's current base weight `R` and
    factors, then cast once to `dtype`; every other tensor is copied (cast to `dtype` if given). Quantized
    (bitsandbytes) layers are dequantized. `config.json` is the base model's, with the inference settings it had
    before training (`use_cache`, which `Trainer` turns off). A README.md model card says how to load it. The
    caller's model is not modified. The directory is written next to `output_dir` under a temporary name and
    renamed when complete.

    Args:
        model: A trained `PeftModel` from `inilora_init`/`load_trained`, or a checkpoint directory
            (loaded with `inilora_hf.load_trained`).
        output_dir: Where to write `model.safetensors` (or shards), `config.json`, `generation_config.json`.
        dtype: Dtype of the saved weights (default: the base model's dtype).
        tokenizer: A tokenizer / processor saved alongside. For a checkpoint directory that holds one, it
            is copied automatically.
        adapter_name: The LoRA adapter to merge (default: the active one).
        base_model: Only for a checkpoint directory: the original base model (id, directory or loaded
            model) if it is not at the location recorded in the checkpoint.
        max_shard_size: Shard the weights past this size.
        overwrite: Replace an existing non-empty `output_dir`.

    Returns:
        The output directory.

    Example:
        >>> from inilora_hf import convert
        >>> convert.to_merged(trained_model, "out/merged")                        # doctest: +SKIP
        >>> convert.to_merged("out/checkpoint-500", "out/merged-500", dtype="bfloat16")   # doctest: +SKIP
        >>> AutoModelForCausalLM.from_pretrained("out/merged")                   # doctest: +SKIP
    """
    peft_model, tokenizer = _resolve(model, base_model=base_model, tokenizer=tokenizer)
    dtype = _as_dtype(dtype)
    base = peft_model.get_base_model()
    out_dtype = dtype or model_dtype(base)
    state = merged_state_dict(peft_model, dtype=out_dtype, adapter_name=adapter_name)
    skeleton = _plain_skeleton(base, out_dtype, getattr(peft_model, "base_inference_config", {}))
    _check_keys(state, skeleton)
    with _atomic_directory(output_dir, overwrite=overwrite) as tmp:
        skeleton.save_pretrained(tmp, state_dict=state, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        export_card(peft_model, kind="merged").save(tmp / CARD_NAME)
    logger.info("Wrote merged checkpoint (%s) to %s.", str(out_dtype).removeprefix("torch."), output_dir)
    return Path(output_dir)


def to_lora(
    model: ModelOrCheckpoint,
    output_dir: str | os.PathLike,
    *,
    adapter_name: str | None = None,
    base_model: str | os.PathLike | nn.Module | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a standard PEFT LoRA adapter that reproduces the trained model on the ORIGINAL base model.

    For residual variants the adapter has rank 2r: `A' = [A; A0]`, `B' = [B, −B0]`, `lora_alpha` doubled
    (×√2 with rsLoRA) so the scaling is unchanged, and `init_lora_weights: true`; A0/B0 come from the
    model's factor set. For `lora`/`gaussian` it is the rank-r adapter itself. `base_model_name_or_path` is
    the base the model was trained on (a Hub id, or a local directory's absolute path) and `task_type` that
    of its class (unless the LoRA config set one), so `AutoPeftModelFor…` loads it from any working directory.
    A README.md model card says so. The directory is written atomically.

    Args:
        model: A trained `PeftModel` from `inilora_init`/`load_trained`, or a checkpoint directory.
        output_dir: Where to write `adapter_model.safetensors` and `adapter_config.json`.
        adapter_name: The LoRA adapter to convert (default: the active one).
        base_model: Only for a checkpoint directory: the original base model, if not where recorded.
        overwrite: Replace an existing non-empty `output_dir`.

    Returns:
        The output directory.

    Example:
        >>> from inilora_hf import convert
        >>> convert.to_lora(trained_model, "out/lora")                            # doctest: +SKIP
        >>> PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_id), "out/lora")   # doctest: +SKIP
        >>> AutoPeftModelForCausalLM.from_pretrained("out/lora")   # loads the recorded base itself   # doctest: +SKIP
    """
    peft_model, _ = _resolve(model, base_model=base_model, tokenizer=None)
    state, config = standard_lora(peft_model, adapter_name=adapter_name)
    base = peft_model.get_base_model()
    # Like PEFT's own save: without a task type, `auto_mapping` names the class for `AutoPeftModel`.
    auto_mapping = None if config.task_type else {"base_model_class": type(base).__name__,
                                                  "parent_library": type(base).__module__}
    with _atomic_directory(output_dir, overwrite=overwrite) as tmp:
        save_torch_state_dict(
            state,
            tmp,
            filename_pattern=ADAPTER_WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"),
            max_shard_size=1 << 62,  # PEFT reads a single adapter file
            metadata={"format": "pt"},
        )
        config.save_pretrained(tmp, auto_mapping_dict=auto_mapping)
        export_card(peft_model, kind="lora", adapter_name=adapter_name).save(tmp / CARD_NAME)
    logger.info("Wrote standard LoRA adapter (r=%d, alpha=%g) to %s.", config.r, config.lora_alpha, output_dir)
    return Path(output_dir)


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
    peft_model = _require_peft(model)
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


def standard_lora(model: PeftModel, *, adapter_name: str | None = None) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """The tensors (PEFT's saved-key layout) and `LoraConfig` of the standard adapter `to_lora` writes.

    Example:
        >>> state, config = standard_lora(trained_model)                          # doctest: +SKIP
        >>> config.r, config.init_lora_weights                                   # doctest: +SKIP
        (16, True)
    """
    peft_model = _require_peft(model)
    factor_set = _require_factor_set(peft_model)
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
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def _add_task_heads(state: dict[str, torch.Tensor], model: PeftModel, task_type: str | None) -> None:
    """Put the task head's current weights (frozen during training, or randomly initialised when the base checkpoint
    has none) into an adapter that gets the task type only now, as PEFT's loader for that task expects them."""
    heads = _TASK_HEADS.get(task_type or "", ())
    for name, module in model.get_base_model().named_modules():
        if name.endswith(heads) and not isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)):
            for key, tensor in module.state_dict().items():
                state.setdefault(f"base_model.model.{name}.{key}", tensor.detach().cpu())


def export_card(model: PeftModel, *, kind: str, adapter_name: str | None = None) -> ModelCard:
    """The model card of a standard export: `kind="merged"` (library transformers) or `"lora"` (library peft).

    It names the base model the run was trained on (for a local one, its absolute path, and what to do on
    another machine), the init variant, the factor set, and the `Auto…` class that loads the export.

    Example:
        >>> print(export_card(trained_model, kind="lora").data.library_name)     # doctest: +SKIP
        peft
    """
    if kind not in ("merged", "lora"):
        raise ValueError(f"kind must be 'merged' or 'lora', got {kind!r}.")
    peft_model = _require_peft(model)
    factor_set = _require_factor_set(peft_model)
    config = factor_set.config
    spec = get_variant(config.variant)
    adapter = adapter_name or peft_model.active_adapter
    classes = task_classes(peft_model.get_base_model(), peft_model.peft_config[adapter].task_type)
    base, revision = trained_base(peft_model)
    hub_base = base if is_hub_id(base) else None
    data = ModelCardData(
        base_model=hub_base,
        library_name="transformers" if kind == "merged" else "peft",
        tags=["inilora", "lora", config.variant] + (["peft"] if kind == "lora" else []),
    )
    if kind == "merged":
        how = (
            "The LoRA update is merged into the weights: `"
            f"{classes.auto_model}.from_pretrained(\"<this folder or repo>\")` loads it, no base model needed."
        )
        residual = " The merged weights are `R + s·B·A = W0 + s·(B·A − B0·A0)`." if spec.residual else ""
    else:
        base_load = f'{classes.auto_model}.from_pretrained("{base or "<base model>"}")'
        how = (
            "A standard PEFT LoRA adapter for the unmodified base model: `"
            f"{classes.auto_peft_model}.from_pretrained(\"<this folder or repo>\")` loads the base recorded in "
            f"`adapter_config.json` and the adapter; `PeftModel.from_pretrained({base_load}, \"<this folder or "
            "repo>\")` does the same with a base you load yourself."
        )
        residual = (
            " The variant trains on a residual base `R = W0 − s·B0·A0`; this adapter has rank 2r "
            "(`A' = [A; A0]`, `B' = [B, −B0]`, same scaling) so that it applies to the original weights `W0`."
            if spec.residual
            else ""
        )
    if base is None:
        where = "The base model has no name or path on record."
    elif hub_base:
        where = f"Base model: the Hub model `{base}`" + (f" at revision `{revision}`." if revision else ".")
    elif kind == "merged":
        where = f"Base model: the local directory `{base}`."
    else:
        where = (
            f"Base model: the local directory `{base}`, recorded in `adapter_config.json` as this absolute path so "
            "that the adapter loads from any working directory on this machine. Elsewhere, load your copy of that "
            "model and pass it to `PeftModel.from_pretrained`."
        )
    repo, factor_revision = factor_set.info.get("source_repo"), factor_set.info.get("source_revision")
    factors = (f"`{repo}`" + (f" at commit `{factor_revision}`" if factor_revision else "")) if repo else None
    lines = [
        f"# {'Merged model' if kind == 'merged' else 'LoRA adapter'} trained with a `{config.variant}` LoRA init",
        "",
        (
            f"Fine-tuned from `{base or 'an unnamed base model'}` with LoRA (rank {config.rank}, alpha "
            f"{config.lora_alpha:g}{', rsLoRA' if config.use_rslora else ''}, targets {config.target_modules!r}), "
            f"initialised with the **{config.variant}** variant by `inilora_hf`.{residual}"
        ),
        "",
        how,
        "",
        where,
        "",
        f"- Init variant: `{config.variant}`" + (f" — {spec.description}" if spec.description else ""),
        (
            f"- Factor set: {factors or 'computed locally'} (config hash `{config.config_hash()}`, "
            f"base-weight key `{factor_set.model_key}`)"
        ),
    ]
    if spec.citation:
        lines += ["", "## Citation", "", "```", spec.citation.strip(), "```"]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def _append_initial_factors(state: dict[str, torch.Tensor], config: LoraConfig, factor_set: FactorSet) -> None:
    """Rank 2r: `A' = [A; A0]`, `B' = [B, −B0]`, so `s·B'A' = s·(BA − B0A0)` on top of `W0`."""
    if config.rank_pattern or config.alpha_pattern:
        raise ValueError(
            "Converting an adapter with `rank_pattern`/`alpha_pattern` is not supported: inilora_hf factor sets "
            "use one rank. Remove the patterns from the LoRA config."
        )
    if not math.isclose(_scaling(config.r, config.lora_alpha, config.use_rslora), factor_set.config.scaling):
        raise ValueError(
            f"The adapter's scaling ({config.lora_alpha}/{config.r}, rslora={config.use_rslora}) differs from the "
            f"factor set's ({factor_set.config.scaling}); it was not trained from this factor set."
        )
    for name, initial in sorted(factor_set.factors.items()):
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
    config.lora_alpha = config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2)
    config.r = 2 * config.r


def _scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def _merged_weight(layer: LoraLayer, adapter: str, name: str) -> torch.Tensor:
    """`W + s·B·A` of one LoRA layer in fp32, `(out, in)` (or `(in, out)` for `fan_in_fan_out` layers)."""
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
    lora_A = layer.lora_A[adapter].weight.detach().float()
    lora_B = folded_lora_B(layer, adapter)  # B, or B·R for LoRA-XS
    delta = layer.scaling[adapter] * (lora_B @ lora_A.to(lora_B.device))
    if getattr(layer, "fan_in_fan_out", False):
        delta = delta.T
    weight = read_weight(layer.get_base_layer())
    return (weight + delta.to(weight.device)).cpu()


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


def _plain_skeleton(base: nn.Module, dtype: torch.dtype, inference_config: dict[str, Any]) -> nn.Module:
    """A weightless (meta-device) instance of the base model's own class, to save the merged state with.

    Saving through it (rather than the PEFT-wrapped base) writes the plain class name, dtype and weight
    conversions without touching the caller's model or its config. `inference_config` holds the values the
    base had before a trainer switched them for training (`apply.TRAINING_SWITCHES`).
    """
    config = copy.deepcopy(base.config)
    for name, value in inference_config.items():
        setattr(config, name, value)
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if attribute in config.__dict__:
            delattr(config, attribute)
    with torch.device("meta"):
        skeleton = type(base)._from_config(config, dtype=dtype)
    if getattr(base, "generation_config", None) is not None:
        skeleton.generation_config = copy.deepcopy(base.generation_config)
    return skeleton


def _check_keys(state: dict[str, torch.Tensor], skeleton: nn.Module) -> None:
    expected = set(skeleton.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"The merged weights do not match {type(skeleton).__name__}'s parameters (missing: {missing[:3]}, "
            f"unexpected: {unexpected[:3]}). The PEFT model holds something the merged export does not handle; "
            "export with `to_lora` instead."
        )


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}; use e.g. torch.bfloat16 or 'bfloat16'.")
    return resolved


def _require_peft(model: Any) -> PeftModel:
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"Expected a trained peft.PeftModel (from inilora_init or inilora_hf.load_trained), got "
            f"{type(model).__name__}. For a Trainer, pass `trainer.model`; for files, pass the checkpoint directory."
        )
    return model


def _require_factor_set(model: PeftModel) -> FactorSet:
    factor_set = getattr(model, "factor_set", None)
    if not isinstance(factor_set, FactorSet):
        raise ValueError(
            "This PeftModel has no `factor_set`, so its initial factors A0/B0 are unknown. Build it with "
            "`inilora_init(...)()` or `inilora_hf.load_trained(checkpoint_dir)`, or set `model.factor_set = "
            "FactorSet.from_pretrained(...)` to the factor set it was trained from."
        )
    return factor_set


def load_checkpoint(
    checkpoint_dir: str | os.PathLike, *, base_model: str | os.PathLike | nn.Module | None = None
) -> tuple[PeftModel, Any]:
    """A checkpoint directory loaded with `inilora_hf.load_trained`, plus its tokenizer (None if it has none).

    Load once, export many times: `to_merged` / `to_lora` accept the returned model.

    Example:
        >>> model, tokenizer = load_checkpoint("out/checkpoint-500")                     # doctest: +SKIP
        >>> to_merged(model, "out/merged", tokenizer=tokenizer); to_lora(model, "out/lora")   # doctest: +SKIP
    """
    directory = Path(checkpoint_dir)
    model = load_trained(directory, base_model=base_model)
    tokenizer = None
    if (directory / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory)
    return model, tokenizer


def _resolve(model: ModelOrCheckpoint, *, base_model: Any, tokenizer: Any) -> tuple[PeftModel, Any]:
    """A model as given, or a checkpoint directory loaded with `load_checkpoint`."""
    if isinstance(model, (str, os.PathLike)):
        loaded, found = load_checkpoint(model, base_model=base_model)
        return loaded, tokenizer if tokenizer is not None else found
    if base_model is not None:
        raise ValueError("`base_model` is only used with a checkpoint directory; a loaded model already has its base.")
    return _require_peft(model), tokenizer


@contextlib.contextmanager
def _atomic_directory(output_dir: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling of `output_dir`; on success it replaces `output_dir`, on error it is removed."""
    target = Path(output_dir)
    if target.is_file():
        raise FileExistsError(f"{target} is a file; give a directory path for the export.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} already exists and is not empty; pass overwrite=True to replace it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
