"""Init variants: the registry plus the built-in families (random, approximation, SVD, data-driven, PEFT-native)."""

from . import approximation, data_driven, peft_data, peft_native, random, svd  # noqa: F401  (registers the built-in variants)
from .inputs import VariantInputs
from .registry import (
    ModuleFactors,
    VariantSpec,
    available_variants,
    get_variant,
    register_variant,
)

__all__ = [
    "ModuleFactors",
    "VariantInputs",
    "VariantSpec",
    "available_variants",
    "get_variant",
    "register_variant",
]
