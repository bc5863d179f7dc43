"""Trained results to standard checkpoints (layer 5): a merged `transformers` model (`to_merged`) or a plain PEFT
LoRA adapter on the original base (`to_lora`), both loadable without this package.

Example:
    >>> from inilora_hf import convert
    >>> convert.to_merged("out/checkpoint-500", "out/merged")   # doctest: +SKIP
"""

from .card import export_card
from .export import to_lora, to_merged
from .lora import standard_lora
from .merged import merged_state_dict
from .trained import load_checkpoint

__all__ = ["export_card", "load_checkpoint", "merged_state_dict", "standard_lora", "to_lora", "to_merged"]
