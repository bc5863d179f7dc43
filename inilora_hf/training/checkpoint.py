"""Transitional: the names `inilora_hf/__init__.py` and `inilora_hf.convert.export` still import from here. They live
in `training.init_metadata` (what a checkpoint records) and `training.trained_model` (`load_trained`); once those two
import lines point there, this module goes."""

from __future__ import annotations

from .init_metadata import CARD_NAME, model_dtype, trained_base
from .trained_model import load_trained

__all__ = ["CARD_NAME", "load_trained", "model_dtype", "trained_base"]
