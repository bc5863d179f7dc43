"""inilora_hf: LoRA initialization variants for Hugging Face Trainer / TRL, with cached, shareable factor sets.

Example:
    >>> from inilora_hf import inilora_init, SFTTrainer
    >>> init = inilora_init("./my-base-model", variant="inilora", rank=8)     # doctest: +SKIP
    >>> model = init()                                                         # doctest: +SKIP
    >>> print(model.init_report.summary())                                     # doctest: +SKIP
"""

from inilora_hf._version import __version__
from inilora_hf.factorsets.factor_set import FactorSet
from inilora_hf.factorsets.publish import download_factor_set, push_factor_set
from inilora_hf.factorsets.report import InitReport
from inilora_hf.training.checkpoint import load_trained
from inilora_hf.training.model_init import InitFunction, inilora_init
from inilora_hf.training.sft import SFTTrainer
from inilora_hf.variants.config import InitConfig

from .errors import (
    BaseModelNotFoundError,
    FactorSetCorruptError,
    FactorSetError,
    FactorSetFormatError,
    FactorSetHubError,
    FactorSetMismatchError,
    FactorSetNotFoundError,
    HubAuthenticationError,
    TargetModuleError,
)
from .trainer_callbacks import (
    ExportCallback,
    InitReportCallback,
    PushStandardCheckpointCallback,
)
from .variants import (
    ModuleFactors,
    VariantInputs,
    available_variants,
    get_variant,
    register_variant,
)

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
    "PushStandardCheckpointCallback",
    "SFTTrainer",
    "TargetModuleError",
    "VariantInputs",
    "__version__",
    "available_variants",
    "download_factor_set",
    "get_variant",
    "inilora_init",
    "load_trained",
    "push_factor_set",
    "register_variant",
]
