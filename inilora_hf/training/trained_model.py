"""`load_trained`: rebuild a trained model from a checkpoint directory written by inilora_hf.

The checkpoint's `inilora_init.json` and `inilora_init/` (see `training.init_metadata`) name the original base
model and hold the initial factors; `load_trained` loads that base, rebuilds the training start exactly with
`inilora_hf.adapters.apply` (A0/B0, and `R = W0 − s·B0·A0` for residual variants) and loads the trained factors over it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import transformers
from peft import LoraConfig, PeftModel
from torch import nn

from inilora_hf.adapters.apply import wrap_with_factors
from inilora_hf.errors import BaseModelNotFoundError
from inilora_hf.factorsets.cache import entry_path
from inilora_hf.factorsets.checkpoint_files import load_pretrained
from inilora_hf.factorsets.compute import model_fingerprints
from inilora_hf.factorsets.factor_set import FactorSet
from inilora_hf.factorsets.lora_config import lora_config_for
from inilora_hf.log import get_logger

from .init_metadata import (
    ADAPTER_CONFIG_NAME,
    INIT_FACTORS_DIR,
    INIT_METADATA_NAME,
    TRAINING_ADAPTER_INIT,
    attach_init_metadata,
    read_init_metadata,
)

logger = get_logger(__name__)

# LoraConfig fields that `lora_config_for` derives from the factor set, or that describe the saved file only.
_DERIVED_LORA_FIELDS = frozenset(
    {
        "r",
        "lora_alpha",
        "use_rslora",
        "rank_pattern",
        "alpha_pattern",
        "target_modules",
        "init_lora_weights",
        "peft_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "runtime_config",
    }
)


def load_trained(
    checkpoint_dir: str | os.PathLike,
    *,
    base_model: str | os.PathLike | nn.Module | None = None,
    factors: FactorSet | str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
    model_class: type | None = None,
    revision: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    is_trainable: bool = False,
    strict: bool = True,
) -> PeftModel:
    """Rebuild a trained model from an adapter / Trainer checkpoint directory written by inilora_hf.

    Loads the original base model, checks its target weights against the factor set's fingerprints,
    rebuilds the training start exactly (`inilora_hf.adapters.apply`: A0/B0 and `R = W0 − s·B0·A0` for residual
    variants) and loads the trained LoRA weights over it.

    Args:
        checkpoint_dir: A directory with `adapter_config.json` + `adapter_model.safetensors` (a
            `checkpoint-N` folder, `trainer.save_model()` output or `model.save_pretrained()` output).
        base_model: The original base model: a Hub id, a directory, or a loaded model (modified in place,
            like `PeftModel.from_pretrained` does). Default: the one recorded in the checkpoint.
        factors: The factor set the run started from (a `FactorSet`, a directory or a Hub repo id). Needed
            only for checkpoints without `inilora_init.json` (written before this metadata existed, or by
            plain PEFT); otherwise it overrides the recorded one.
        dtype: Dtype to load the base model in (default: the dtype used in training, as recorded).
        model_class: Class to load the base with (default: the recorded class, e.g. `LlamaForCausalLM`).
        revision: Revision of the base model on the Hub (default: the recorded one).
        model_kwargs: Extra `from_pretrained` arguments for the base model.
        is_trainable: Keep the LoRA weights trainable (default: frozen, eval mode).
        strict: Refuse a base model whose target weights do not match the factor set's fingerprints.

    Returns:
        A `PeftModel` with `.factor_set` and `.init_report`, whose `save_pretrained` keeps writing the
        metadata, ready for `inilora_hf.convert.to_merged` / `to_lora`.

    Raises:
        FileNotFoundError: `checkpoint_dir` is not an adapter directory.
        BaseModelNotFoundError: The base model is not found (missing directory, repo or revision; offline miss).
        ValueError: The checkpoint has no init metadata and no `factors=` was given, or the adapter does not
            fit the factor set.
        FactorSetMismatchError: The base model's weights are not those the factors were computed from.

    Example:
        >>> from inilora_hf import load_trained
        >>> model = load_trained("out/checkpoint-500")                            # doctest: +SKIP
        >>> model = load_trained("out/checkpoint-500", base_model="./llama-local-copy")   # doctest: +SKIP
    """
    directory = Path(checkpoint_dir)
    if not (directory / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{directory} has no adapter_config.json: it is not a PEFT adapter or Trainer checkpoint directory."
        )
    metadata = read_init_metadata(directory) or {}
    factor_set = _resolve_factor_set(directory, metadata, factors)
    adapter = metadata.get("adapter_name", "default")
    saved = _saved_lora_config(directory)
    lora_kwargs = _lora_kwargs(saved, factor_set, directory)
    base, base_revision = _load_base(
        base_model,
        metadata,
        factor_set,
        dtype=dtype,
        model_class=model_class,
        revision=revision,
        model_kwargs=model_kwargs,
    )
    if strict and (getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)):
        # Quantized weights cannot match the full-precision fingerprints; the stored residual fixes R instead.
        logger.info("Base model is quantized: fingerprint check skipped; the factor set's stored residual is used.")
    elif strict:
        factor_set.check_compatible(model_fingerprints(base, factor_set.config))
    source = metadata.get("factor_source") or ("given" if factors is not None else str(directory / INIT_FACTORS_DIR))
    peft_model = wrap_with_factors(
        base, factor_set, adapter_name=adapter, source=source, revision=base_revision, **lora_kwargs
    )
    result = peft_model.load_adapter(directory, adapter, is_trainable=is_trainable)
    if result.missing_keys:
        raise ValueError(
            f"{directory} lacks LoRA weights for {sorted(result.missing_keys)[:3]}; the adapter is incomplete."
        )
    if not is_trainable:
        peft_model.eval()
        for parameter in peft_model.parameters():
            parameter.requires_grad_(False)
    logger.info("Loaded trained %s model from %s.", factor_set.config.variant, directory)
    return attach_init_metadata(peft_model)


def _saved_lora_config(directory: Path) -> LoraConfig:
    """The adapter's `LoraConfig`, with the `TRAINING_ADAPTER_INIT` marker read as PEFT's default `True`."""
    attributes = LoraConfig.from_json_file(str(directory / ADAPTER_CONFIG_NAME))
    if attributes.get("init_lora_weights") == TRAINING_ADAPTER_INIT:
        attributes["init_lora_weights"] = True
    return LoraConfig.from_peft_type(**LoraConfig.check_kwargs(**attributes))


def _resolve_factor_set(directory: Path, metadata: dict[str, Any], factors: Any) -> FactorSet:
    if factors is not None:
        return factors if isinstance(factors, FactorSet) else FactorSet.from_pretrained(factors)
    if not metadata:
        raise ValueError(
            f"{directory} has no {INIT_METADATA_NAME} and no {INIT_FACTORS_DIR}/, so the starting point of the run "
            "(initial factors A0/B0 and the residual base weight) is unknown. Pass the factor set the run started "
            "from: `load_trained(dir, factors=<FactorSet, directory or Hub repo id>)` (e.g. "
            "`model.factor_set.save_pretrained(...)` output, or the cache entry inilora_init used)."
        )
    factor_dir = directory / metadata.get("factors", INIT_FACTORS_DIR)
    if not factor_dir.is_dir():
        raise ValueError(
            f"{directory} has {INIT_METADATA_NAME} but its factor directory {factor_dir.name}/ is missing (partly "
            "copied?). Copy it along, or pass `load_trained(dir, factors=...)`."
        )
    if metadata.get("residual_stored"):
        return _factor_set_with_residual(directory, metadata)
    return FactorSet.from_pretrained(factor_dir)


def _factor_set_with_residual(directory: Path, metadata: dict[str, Any]) -> FactorSet:
    """The run's full factor set (with the stored residual of a quantized base, which checkpoints do not copy):
    from its recorded Hub repo and commit, else from the default local cache."""
    candidates: list[tuple[str, dict[str, Any]]] = []
    if metadata.get("factor_repo"):
        candidates.append((metadata["factor_repo"], {"revision": metadata.get("factor_revision")}))
    if metadata.get("cache_key"):
        cached = entry_path(metadata["cache_key"])
        if cached.is_dir():
            candidates.append((str(cached), {}))
    for source, kwargs in candidates:
        try:
            factor_set = FactorSet.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as error:
            logger.info("Could not load the run's factor set from %s: %s", source, error)
            continue
        if factor_set.has_residual and factor_set.model_key == metadata.get("model_key"):
            return factor_set
    raise ValueError(
        f"The run in {directory} used a factor set with a stored residual (a quantized base), which checkpoints do "
        f"not copy, and it is neither in the local cache nor at a recorded Hub repo. Pass it: `load_trained(dir, "
        f"factors=<directory or repo id>)` (recorded source: {metadata.get('factor_source') or 'unknown'})."
    )


def _lora_kwargs(saved: LoraConfig, factor_set: FactorSet, directory: Path) -> dict[str, Any]:
    """The saved adapter's LoRA options that differ from defaults, after checking it fits the factor set."""
    config = factor_set.config
    alpha = config.rank if config.lora_alpha is None else config.lora_alpha  # None only before __post_init__
    expected = lora_config_for(factor_set)
    if (saved.r, float(saved.lora_alpha), bool(saved.use_rslora), saved.rank_pattern, saved.alpha_pattern) != (
        config.rank,
        float(alpha),
        config.use_rslora,
        expected.rank_pattern,
        expected.alpha_pattern,
    ):
        raise ValueError(
            f"The adapter in {directory} has r={saved.r}, lora_alpha={saved.lora_alpha}, "
            f"use_rslora={saved.use_rslora}, rank_pattern={saved.rank_pattern}, alpha_pattern={saved.alpha_pattern}, "
            f"but the factor set has r={config.rank}, lora_alpha={config.lora_alpha}, use_rslora={config.use_rslora}, "
            f"rank_pattern={expected.rank_pattern}, alpha_pattern={expected.alpha_pattern}. "
            "It was not trained from this factor set (a standard adapter from `to_lora` loads with plain "
            "`PeftModel.from_pretrained` on the original base instead)."
        )
    default = LoraConfig()
    return {
        name: getattr(saved, name)
        for name in LoraConfig.__dataclass_fields__
        if name not in _DERIVED_LORA_FIELDS
        and LoraConfig.__dataclass_fields__[name].init
        and getattr(saved, name) != getattr(default, name)
    }


def _load_base(
    base_model: Any,
    metadata: dict[str, Any],
    factor_set: FactorSet,
    *,
    dtype: Any,
    model_class: type | None,
    revision: str | None,
    model_kwargs: dict[str, Any] | None,
) -> tuple[nn.Module, str | None]:
    """The base model to rebuild the run on, and the revision it was loaded at."""
    if isinstance(base_model, PeftModel):
        raise TypeError("`base_model` must be the original model without adapters, not a PeftModel.")
    if isinstance(base_model, nn.Module):
        return base_model, None
    name = base_model if base_model is not None else metadata.get("base_model") or factor_set.base_model
    if not name:
        raise ValueError("The checkpoint does not record its base model; pass `load_trained(dir, base_model=...)`.")
    kwargs = dict(model_kwargs or {})
    if base_model is None:
        revision = revision or metadata.get("base_revision") or factor_set.base_revision
    if revision is not None:
        kwargs.setdefault("revision", revision)
    dtype = dtype if dtype is not None else metadata.get("base_dtype")
    if dtype is not None:
        kwargs.setdefault("dtype", dtype)
    if model_class is None:
        model_class = (
            getattr(transformers, str(metadata.get("base_model_class")), None) or transformers.AutoModelForCausalLM
        )
    try:
        return load_pretrained(model_class, str(name), **kwargs), kwargs.get("revision")
    except BaseModelNotFoundError as error:
        if base_model is not None:
            raise
        raise BaseModelNotFoundError(
            f"{error} (It is the base model recorded in the checkpoint; to use another copy of it, pass "
            "`load_trained(dir, base_model=<Hub id, directory or loaded model>)`.)"
        ) from error
    except OSError as error:
        raise OSError(
            f"Could not load the base model {name!r} recorded in the checkpoint ({error}). Pass the original base "
            "model: `load_trained(dir, base_model=<Hub id, directory or loaded model>)`."
        ) from error
