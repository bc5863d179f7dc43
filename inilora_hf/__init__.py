"""inilora_hf: LoRA initialization variants for Hugging Face Trainer / TRL, with cached, shareable factor sets.

Example:
    >>> from inilora_hf import inilora_init, SFTTrainer
    >>> init = inilora_init("./my-base-model", variant="inilora", rank=8)     # doctest: +SKIP
    >>> model = init()                                                         # doctest: +SKIP
    >>> print(model.init_report.summary())                                     # doctest: +SKIP

Importing the package is light: each public name below is imported from its module on first use (PEP 562), so
that `inilora-hf --help` answers without loading torch, transformers and peft.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    BaseModelNotFoundError,
    FactorSetCorruptError,
    FactorSetError,
    FactorSetFormatError,
    FactorSetHubError,
    FactorSetMismatchError,
    FactorSetNotFoundError,
    HubAuthenticationError,
    OutputExistsError,
    RankMismatchError,
    TargetModuleError,
    UnsupportedShardingError,
)

# Public name → the module that defines it, imported when the name is first used.
_LAZY_EXPORTS = {
    "load_trained": "training.trained_model",
    "compare": "comparison",
    "InitConfig": "variants.config",
    "FactorSet": "factorsets.factor_set",
    "download_factor_set": "factorsets.publish",
    "push_factor_set": "factorsets.publish",
    "InitFunction": "training.model_init",
    "inilora_init": "training.model_init",
    "InitReport": "factorsets.report",
    "ExportCallback": "trainer_callbacks",
    "InitReportCallback": "trainer_callbacks",
    "PushStandardCheckpointCallback": "trainer_callbacks",
    "SFTTrainer": "training.sft",
    "ModuleFactors": "variants",
    "VariantInputs": "variants",
    "available_variants": "variants",
    "get_variant": "variants",
    "register_variant": "variants",
}

if TYPE_CHECKING:
    from .comparison import compare
    from .factorsets.factor_set import FactorSet
    from .factorsets.publish import download_factor_set, push_factor_set
    from .factorsets.report import InitReport
    from .trainer_callbacks import ExportCallback, InitReportCallback, PushStandardCheckpointCallback
    from .training.model_init import InitFunction, inilora_init
    from .training.sft import SFTTrainer
    from .training.trained_model import load_trained
    from .variants import ModuleFactors, VariantInputs, available_variants, get_variant, register_variant
    from .variants.config import InitConfig

__all__ = [
    "BaseModelNotFoundError",
    "ExportCallback",
    "FactorSet",
    "FactorSetCorruptError",
    "FactorSetError",
    "FactorSetFormatError",
    "FactorSetHubError",
    "FactorSetMismatchError",
    "FactorSetNotFoundError",
    "HubAuthenticationError",
    "InitConfig",
    "InitFunction",
    "InitReport",
    "InitReportCallback",
    "ModuleFactors",
    "OutputExistsError",
    "PushStandardCheckpointCallback",
    "RankMismatchError",
    "SFTTrainer",
    "TargetModuleError",
    "UnsupportedShardingError",
    "VariantInputs",
    "__version__",
    "available_variants",
    "compare",
    "download_factor_set",
    "get_variant",
    "inilora_init",
    "load_trained",
    "push_factor_set",
    "register_variant",
]


def __getattr__(name: str) -> Any:
    """A public name or a submodule (`inilora_hf.convert`), imported on first access."""
    module = _LAZY_EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if not name.startswith("__"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
