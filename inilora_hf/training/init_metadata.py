"""What a checkpoint must hold to rebuild a trained model exactly, and the card that says how to load it.

PEFT saves only the LoRA factors. A residual variant also changed the base weight to `R = W0 − s·B0·A0`,
so every adapter directory this package writes gets, next to PEFT's files:

* `inilora_init.json`: the `InitConfig`, the factor-set reference (base model id/revision, `model_key`,
  `config_hash`, cache key, where the factors came from), the base class and dtype, library versions;
* `inilora_init/`: the initial factors A0/B0 as a `FactorSet` directory (plain safetensors plus
  `inilora_factors.json` with the base-weight fingerprints), without any stored residual.

`attach_init_metadata(peft_model)` makes the model write both on every `save_pretrained` call, which covers
each `Trainer` / `SFTTrainer` `checkpoint-N` folder and `trainer.save_model()`. `load_trained(dir)`
(`training.trained_model`) loads the original base, rebuilds `R` with `inilora_hf.adapters.apply` exactly as at training
start, and loads the trained factors.

Such a directory looks like a plain PEFT adapter, but for a residual (or LoRA-XS) variant it is not one: on the
original base its factors compute `W0 + s·B·A`, not the trained `R + s·B·A`. So the save also replaces PEFT's
stock README.md by a card that says so and names the two ways out (`load_trained`, the standard exports of
`inilora_hf.convert`), and writes `init_lora_weights: TRAINING_ADAPTER_INIT` into `adapter_config.json`: plain
`PeftModel.from_pretrained` / `AutoPeftModelFor…` then fail with PEFT's "Unknown initialization
init_lora_weights='inilora_hf: …'" instead of silently computing something else. Trainer resume and
`load_adapter` into the existing adapter never read that field, and `load_trained` maps it back to `True`.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData
from peft import PeftModel
from torch import nn

from inilora_hf.adapters.tasks import task_classes
from inilora_hf.errors import FactorSetFormatError
from inilora_hf.factorsets.checkpoint_files import model_reference
from inilora_hf.factorsets.factor_set import FactorSet
from inilora_hf.factorsets.fingerprint import cache_key
from inilora_hf.factorsets.format import library_versions
from inilora_hf.hub.transport import is_hub_id
from inilora_hf.variants import get_variant

INIT_METADATA_NAME = "inilora_init.json"
INIT_FACTORS_DIR = "inilora_init"
INIT_FORMAT_VERSION = 1

#: `init_lora_weights` written into the `adapter_config.json` of a training-time adapter that plain PEFT must not
#: load (residual and LoRA-XS variants). PEFT rejects it: "Unknown initialization init_lora_weights='<this>'".
TRAINING_ADAPTER_INIT = (
    "inilora_hf: not a standalone adapter, it needs the residual base (or LoRA-XS cores) of its init. Load it with "
    "inilora_hf.load_trained(dir), or use the standard exports of inilora_hf.convert.to_lora / to_merged"
)
ADAPTER_CONFIG_NAME = "adapter_config.json"
CARD_NAME = "README.md"


def init_metadata(model: PeftModel) -> dict[str, Any]:
    """The JSON document `save_init_metadata` writes (see the module docstring).

    Example:
        >>> init_metadata(inilora_init("./base")())["config_hash"]              # doctest: +SKIP
        '5f0c3a9e1d2b4c67'
    """
    factor_set = _factor_set_of(model)
    report = getattr(model, "init_report", None)
    base = model.get_base_model()
    adapter = getattr(model, "active_adapter", "default")
    base_model, base_revision = trained_base(model)
    return {
        "format_version": INIT_FORMAT_VERSION,
        "adapter_name": adapter,
        "config": factor_set.config.to_dict(),
        "variant": factor_set.config.variant,
        "residual": get_variant(factor_set.config.variant).residual,
        "scaling": factor_set.config.scaling,
        "module_ranks": {name: factor_set.config.rank_for(name) for name in sorted(factor_set.factors)},
        "module_scalings": {name: factor_set.config.scaling_for(name) for name in sorted(factor_set.factors)},
        "base_model": base_model,
        "base_revision": base_revision,
        "base_model_class": type(base).__name__,
        "base_dtype": str(model_dtype(base)).removeprefix("torch."),
        "model_key": factor_set.model_key,
        "config_hash": factor_set.config.config_hash(),
        "cache_key": factor_set.info.get("cache_key") or cache_key(factor_set.model_key, factor_set.config),
        "factor_source": getattr(report, "source", "") or "",
        "factor_repo": factor_set.info.get("source_repo"),
        "factor_revision": factor_set.info.get("source_revision"),
        "factor_info": _json_safe(factor_set.info),
        "residual_stored": factor_set.has_residual,
        "factors": INIT_FACTORS_DIR,
        "versions": library_versions(),
    }


def trained_base(model: PeftModel) -> tuple[str | None, str | None]:
    """The base model `model` was built on, as (Hub id or absolute local path, revision).

    That is what its adapter config records (`wrap_with_factors` writes the base actually loaded, local
    directories made absolute); for a model built otherwise, the factor set's base.

    Example:
        >>> trained_base(inilora_init("./base")())                              # doctest: +SKIP
        ('/home/me/base', None)
    """
    factor_set = _factor_set_of(model)
    config = model.peft_config.get(getattr(model, "active_adapter", "default"))
    name = getattr(config, "base_model_name_or_path", None)
    if name:
        return model_reference(name), getattr(config, "revision", None)
    if factor_set.base_model:
        return model_reference(factor_set.base_model), factor_set.base_revision
    return None, None


def needs_init_state(factor_set: FactorSet) -> bool:
    """Whether a raw adapter trained from `factor_set` is wrong without inilora_hf: a residual variant (the base
    weights became `R`) or variant tensors PEFT cannot hold (LoRA-XS cores)."""
    return get_variant(factor_set.config.variant).residual or bool(factor_set.variant_extras)


def save_init_metadata(model: PeftModel, directory: str | os.PathLike) -> Path:
    """Write `inilora_init.json` and `inilora_init/` (A0/B0 + fingerprints) into `directory`.

    Example:
        >>> model = inilora_init("./base", variant="inilora")()                 # doctest: +SKIP
        >>> model.save_pretrained("out/adapter")                                 # doctest: +SKIP
        >>> save_init_metadata(model, "out/adapter")   # automatic for models from inilora_init   # doctest: +SKIP
    """
    directory = Path(directory)
    document = init_metadata(model)
    _factor_set_of(model).save_pretrained(directory / INIT_FACTORS_DIR, include_residual=False)
    _write_text(directory / INIT_METADATA_NAME, json.dumps(document, indent=2, sort_keys=True))
    return directory


def read_init_metadata(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint's `inilora_init.json`, or None when it has none.

    Example:
        >>> read_init_metadata("out/checkpoint-500")["variant"]                 # doctest: +SKIP
        'inilora'
    """
    file = Path(directory) / INIT_METADATA_NAME
    if not file.is_file():
        return None
    try:
        document = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise FactorSetFormatError(
            f"{file} is not valid JSON ({error}); the checkpoint metadata is corrupted."
        ) from error
    version = document.get("format_version")
    if not isinstance(version, int) or version > INIT_FORMAT_VERSION:
        raise FactorSetFormatError(
            f"{file} has format version {version!r}; this inilora_hf reads up to {INIT_FORMAT_VERSION}. "
            "Upgrade: `pip install -U inilora_hf`."
        )
    return document


def attach_init_metadata(peft_model: PeftModel) -> PeftModel:
    """Make `peft_model.save_pretrained(dir, ...)` also write the init metadata into `dir` (idempotent).

    `Trainer._save` calls `self.model.save_pretrained(output_dir, ...)` for every checkpoint and for
    `save_model()`, so the metadata lands in each `checkpoint-N` and in the final output. The hook is an
    instance attribute (a `functools.partial` of a module-level function), so `copy.deepcopy` and pickling
    keep it bound to the right model. Metadata is skipped when `is_main_process=False` and when PEFT converts
    the adapter itself (`path_initial_model_for_weight_conversion`), whose output is a standard LoRA.

    Example:
        >>> model = attach_init_metadata(wrap_with_factors(base, factor_set))   # doctest: +SKIP
        >>> model.save_pretrained("out")    # adapter files + inilora_init.json + inilora_init/   # doctest: +SKIP
    """
    _factor_set_of(peft_model)
    current = peft_model.__dict__.get("save_pretrained")
    if not (isinstance(current, functools.partial) and current.func is _save_pretrained_with_init_metadata):
        # An instance attribute shadowing the method, written into `__dict__` where the check above reads it.
        peft_model.__dict__["save_pretrained"] = functools.partial(_save_pretrained_with_init_metadata, peft_model)
    return peft_model


def _save_pretrained_with_init_metadata(
    model: PeftModel, save_directory: str | os.PathLike, *args: Any, **kwargs: Any
) -> Any:
    method = type(model).save_pretrained
    # PEFT annotates `save_directory: str`; its os.path calls convert a PathLike with `os.fspath` all the same.
    result = method(model, os.fspath(save_directory), *args, **kwargs)
    bound = inspect.signature(method).bind(model, save_directory, *args, **kwargs)
    bound.apply_defaults()
    options = bound.arguments
    if options.get("is_main_process", True) and options.get("path_initial_model_for_weight_conversion") is None:
        save_init_metadata(model, save_directory)
        label_training_adapter(model, save_directory)
    return result


def label_training_adapter(model: PeftModel, directory: str | os.PathLike) -> Path:
    """Give a saved training-time adapter this package's README.md card and, when plain PEFT would load it wrongly
    (`needs_init_state`), the `TRAINING_ADAPTER_INIT` marker in its `adapter_config.json` (see the module
    docstring). Automatic in every `save_pretrained` of a model from `inilora_init` / `load_trained`.

    Example:
        >>> model.save_pretrained("out/adapter")   # writes the card and the marker itself   # doctest: +SKIP
        >>> PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("./base"), "out/adapter")   # doctest: +SKIP
        Traceback (most recent call last):
        ValueError: Unknown initialization init_lora_weights='inilora_hf: not a standalone adapter, ...'
    """
    directory = Path(directory)
    factor_set = _factor_set_of(model)
    adapter = getattr(model, "active_adapter", "default")
    config_file = (directory if adapter == "default" else directory / adapter) / ADAPTER_CONFIG_NAME
    if needs_init_state(factor_set) and config_file.is_file():
        document = json.loads(config_file.read_text())
        document["init_lora_weights"] = TRAINING_ADAPTER_INIT
        _write_text(config_file, json.dumps(document, indent=2, sort_keys=True))
    _write_text(directory / CARD_NAME, str(training_adapter_card(model)))
    return directory


def training_adapter_card(model: PeftModel) -> ModelCard:
    """The README.md of a training-time adapter directory: what it is, what it needs, how to load or export it.

    Example:
        >>> print(training_adapter_card(trained_model).text.splitlines()[0])   # doctest: +SKIP
        # inilora_hf training adapter (`pissa` LoRA init): not a standalone PEFT adapter
    """
    factor_set = _factor_set_of(model)
    config = factor_set.config
    variant = config.variant
    base, revision = trained_base(model)
    classes = task_classes(model.get_base_model(), model.peft_config[model.active_adapter].task_type)
    base_text = (f"`{base}`" + (f" (revision `{revision}`)" if revision else "")) if base else "an unnamed base model"
    local = (
        f"\n\n   The base `{base}` is a local directory, recorded as an absolute path; elsewhere, pass your copy "
        "of it: "
        "`load_trained(dir, base_model=...)`."
        if base and not is_hub_id(base)
        else ""
    )
    setup = (
        f"Trained by `inilora_hf` from {base_text} with LoRA (rank {config.rank}, alpha {config.lora_alpha:g}"
        f"{', rsLoRA' if config.use_rslora else ''}{config.pattern_summary()}, "
        f"targets {config.target_modules!r}), initialised with the "
        f"**{variant}** variant. This folder holds the factors as training saved them (a `checkpoint-N` folder, or "
        "`trainer.save_model()` / `model.save_pretrained()` output)."
    )
    files = f"""
| file | content |
|---|---|
| `adapter_config.json`, `adapter_model.safetensors` | the trained LoRA factors (PEFT layout) |
| `{INIT_METADATA_NAME}` | the init config, the base model reference and the factor set's identity |
| `{INIT_FACTORS_DIR}/` | the initial factors A0, B0 the run started from |
"""
    if not needs_init_state(factor_set):
        data = ModelCardData(
            base_model=base if is_hub_id(base) else None, library_name="peft", tags=["inilora", "lora", "peft", variant]
        )
        body = f"""# LoRA adapter trained with a `{variant}` LoRA init (inilora_hf)

{setup}

The `{variant}` variant leaves the base weights unchanged, so this is a standard PEFT adapter for the original base
model: `PeftModel.from_pretrained(base_model, "path/to/this/folder")`. `inilora_hf.load_trained` and trainer resume
also use the init metadata below.
{files}"""
        return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    if get_variant(variant).residual:
        why = (
            f"The `{variant}` variant trains on a **residual base**: every target weight `W0` of the base model was "
            "replaced by `R = W0 − s·B0·A0` (s = LoRA scaling), and PEFT saves only the LoRA factors, never `R`. On "
            "the original base model these factors compute `W0 + s·B·A` instead of the trained `R + s·B·A`: other "
            "outputs, without any error."
        )
    else:
        why = (
            f"The `{variant}` variant trains an r×r core between frozen factors (LoRA-XS), a layer plain PEFT does "
            "not have: loaded with PEFT alone, these factors compute something else than the trained model, without "
            "any error."
        )
    data = ModelCardData(tags=["inilora", "inilora-training-adapter", variant])
    body = f"""# inilora_hf training adapter (`{variant}` LoRA init): not a standalone PEFT adapter

{setup}

**Do not load it with `PeftModel.from_pretrained` on the original base model.** {why} So that this cannot happen
silently, `adapter_config.json` declares `init_lora_weights: "inilora_hf: …"`, which plain
`PeftModel.from_pretrained` and `{classes.auto_peft_model}` refuse with an error.

Two ways out:

1. **With inilora_hf**: `load_trained` rebuilds the starting point from the original base model and
   `{INIT_FACTORS_DIR}/`, then loads the trained factors; resuming training works as usual
   (`trainer.train(resume_from_checkpoint="path/to/checkpoint-N")`).

   ```python
   from inilora_hf import load_trained
   model = load_trained("path/to/this/folder")
   ```{local}

2. **Without inilora_hf**: export standard checkpoints once, then load them with plain transformers / PEFT on the
   original base model:

   ```bash
   inilora-hf convert path/to/this/folder --merged merged --lora lora
   ```

   ```python
   from transformers import {classes.auto_model}
   from peft import {classes.auto_peft_model}
   merged = {classes.auto_model}.from_pretrained("merged")       # the LoRA update merged into the weights
   adapter = {classes.auto_peft_model}.from_pretrained("lora")   # a standard adapter on the original base
   ```

   (`inilora_hf.convert.to_merged` / `to_lora` do the same from Python.)
{files}"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _write_text(path: Path, text: str) -> None:
    """Replace `path` atomically."""
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)


def _factor_set_of(model: Any) -> FactorSet:
    factor_set = getattr(model, "factor_set", None)
    if not isinstance(model, PeftModel) or not isinstance(factor_set, FactorSet):
        raise ValueError(
            f"Expected a PeftModel built by inilora_init or load_trained (with a `.factor_set`), got a "
            f"{type(model).__name__} without one. Set `model.factor_set = FactorSet.from_pretrained(...)` to the "
            "factor set it was trained from."
        )
    return factor_set


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model was loaded in (for a quantized model, the dtype before quantization)."""
    pre_quantization = getattr(getattr(model, "config", None), "_pre_quantization_dtype", None)
    if isinstance(pre_quantization, torch.dtype):
        return pre_quantization
    return getattr(model, "dtype", torch.float32)


def _json_safe(value: Any) -> Any:
    """`value` with anything JSON cannot hold turned into a string."""
    return json.loads(json.dumps(value, default=str))
