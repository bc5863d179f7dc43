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

This module writes the directories; the tensors come from `convert.merged` (`merged_state_dict`) and
`convert.lora` (`standard_lora`), the model cards from `convert.card`, checkpoint loading from `convert.trained`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict
from peft import PeftModel
from torch import nn

from inilora_hf.log import get_logger
from inilora_hf.output_dirs import staged_output_dir
from inilora_hf.training.init_metadata import CARD_NAME, model_dtype

from .card import export_card
from .lora import standard_lora
from .merged import check_keys, merged_state_dict, plain_skeleton
from .sharded import export_sharded, is_sharded
from .trained import load_checkpoint, require_peft

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
    if isinstance(model, PeftModel) and is_sharded(model):  # FSDP: gather on every rank, write on rank 0
        return export_sharded(
            model,
            lambda: to_merged(
                model,
                output_dir,
                dtype=dtype,
                tokenizer=tokenizer,
                adapter_name=adapter_name,
                base_model=base_model,
                max_shard_size=max_shard_size,
                overwrite=overwrite,
            ),
        )
    peft_model, tokenizer = _resolve(model, base_model=base_model, tokenizer=tokenizer)
    dtype = _as_dtype(dtype)
    base = peft_model.get_base_model()
    out_dtype = dtype or model_dtype(base)
    state = merged_state_dict(peft_model, dtype=out_dtype, adapter_name=adapter_name)
    skeleton = plain_skeleton(base, out_dtype, getattr(peft_model, "base_inference_config", {}))
    check_keys(state, skeleton)
    with staged_output_dir(output_dir, overwrite=overwrite) as tmp:
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
    if isinstance(model, PeftModel) and is_sharded(model):  # FSDP: gather on every rank, write on rank 0
        return export_sharded(
            model,
            lambda: to_lora(model, output_dir, adapter_name=adapter_name, base_model=base_model, overwrite=overwrite),
        )
    peft_model, _ = _resolve(model, base_model=base_model, tokenizer=None)
    state, config = standard_lora(peft_model, adapter_name=adapter_name)
    base = peft_model.get_base_model()
    # Like PEFT's own save: without a task type, `auto_mapping` names the class for `AutoPeftModel`.
    auto_mapping = (
        None if config.task_type else {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
    )
    with staged_output_dir(output_dir, overwrite=overwrite) as tmp:
        save_torch_state_dict(
            state,
            tmp,
            filename_pattern=ADAPTER_WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"),
            max_shard_size=1 << 62,  # PEFT reads a single adapter file
            metadata={"format": "pt"},
        )
        config.save_pretrained(str(tmp), auto_mapping_dict=auto_mapping)
        export_card(peft_model, kind="lora", adapter_name=adapter_name).save(tmp / CARD_NAME)
    logger.info("Wrote standard LoRA adapter (r=%d, alpha=%g) to %s.", config.r, config.lora_alpha, output_dir)
    return Path(output_dir)


def _resolve(model: ModelOrCheckpoint, *, base_model: Any, tokenizer: Any) -> tuple[PeftModel, Any]:
    """A model as given, or a checkpoint directory loaded with `load_checkpoint`."""
    if isinstance(model, (str, os.PathLike)):
        loaded, found = load_checkpoint(model, base_model=base_model)
        return loaded, tokenizer if tokenizer is not None else found
    if base_model is not None:
        raise ValueError("`base_model` is only used with a checkpoint directory; a loaded model already has its base.")
    return require_peft(model), tokenizer


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A `torch.dtype` given as itself or by name (`"bfloat16"`, `"torch.bfloat16"`); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}; use e.g. torch.bfloat16 or 'bfloat16'.")
    return resolved
