"""The trained model an export is made from: a checkpoint directory loaded (`load_checkpoint`), and the checks that
a given model is a `PeftModel` that knows its factor set (the initial factors A0/B0 of residual variants)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from peft import PeftModel
from torch import nn
from transformers import AutoTokenizer

from inilora_hf.factorsets.factor_set import FactorSet
from inilora_hf.training.trained_model import load_trained


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
        tokenizer = AutoTokenizer.from_pretrained(directory)
    return model, tokenizer


def require_peft(model: Any) -> PeftModel:
    """`model` itself if it is a `PeftModel`; otherwise a `TypeError` saying what to pass instead.

    Example:
        >>> peft_model = require_peft(trainer.model)                              # doctest: +SKIP
    """
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"Expected a trained peft.PeftModel (from inilora_init or inilora_hf.load_trained), got "
            f"{type(model).__name__}. For a Trainer, pass `trainer.model`; for files, pass the checkpoint directory."
        )
    return model


def require_factor_set(model: PeftModel) -> FactorSet:
    """The `FactorSet` the model was initialised from (`model.factor_set`); a `ValueError` if it has none.

    Example:
        >>> require_factor_set(load_trained("out/checkpoint-500")).config.variant    # doctest: +SKIP
        'inilora'
    """
    factor_set = getattr(model, "factor_set", None)
    if not isinstance(factor_set, FactorSet):
        raise ValueError(
            "This PeftModel has no `factor_set`, so its initial factors A0/B0 are unknown. Build it with "
            "`inilora_init(...)()` or `inilora_hf.load_trained(checkpoint_dir)`, or set `model.factor_set = "
            "FactorSet.from_pretrained(...)` to the factor set it was trained from."
        )
    return factor_set
