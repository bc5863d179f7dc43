"""Exceptions users can catch; every message names the problem and the fix."""


class FactorSetError(ValueError):
    """Base class for problems with a factor set (files, format, or fit to a base model)."""


class FactorSetCorruptError(FactorSetError):
    """A factor-set file is missing, truncated or does not match its recorded checksum."""


class FactorSetFormatError(FactorSetError):
    """The metadata was written by an incompatible (newer) version of inilora_hf, or is malformed."""


class FactorSetMismatchError(FactorSetError):
    """The factor set was computed for a different base model (shapes or weights differ)."""


class TargetModuleError(ValueError):
    """`target_modules` matches nothing, or matches a module inilora_hf cannot initialise."""


class FactorSetHubError(FactorSetError):
    """A factor set could not be pushed to or pulled from the Hub."""


class FactorSetNotFoundError(FactorSetHubError):
    """No factor set at that repo / revision: the repo or revision does not exist (or is private), the repo is
    not an inilora_hf factor-set repo, or it is not in the local cache while offline."""


class HubAuthenticationError(FactorSetHubError):
    """A push needs a Hugging Face token with write access, and none was found or it was refused."""


class OutputExistsError(FileExistsError):
    """An output folder already holds a result (or other files); it is replaced only with `overwrite=True`
    (command line: `--overwrite`)."""


class BaseModelNotFoundError(FileNotFoundError):
    """The base model cannot be loaded: no such local directory, no such Hub repo or revision (or it is private),
    or it is not in the local cache while offline."""


class PeftInitError(RuntimeError):
    """PEFT's own init did something the variant does not declare (it changed the base weight differently, or froze
    other factors), typically under a PEFT version whose init changed: pin the PEFT version the variant was checked
    with, or report it."""


class VariantOptionError(ValueError):
    """A variant option has an unknown name or an invalid value; the message names the option and what it accepts."""


class CalibrationDataError(ValueError):
    """A data-driven variant got no calibration data, or data it cannot use (e.g. EVA would leave a target module
    with rank 0); the message says how to pass or change it."""


class RankMismatchError(ValueError):
    """The ranks of a distributed job were started with different arguments, base weights or calibration data, so
    they would compute different factor sets: start every rank with the same ones."""


class UnsupportedShardingError(ValueError):
    """What the init cannot do under DeepSpeed ZeRO-3 (a bitsandbytes-quantized base, a data-driven variant still to
    compute, an already partitioned loaded model): use DDP, FSDP or ZeRO stage 1 or 2, or the fix the message names."""


class CompareInputError(ValueError):
    """An input of `inilora_hf.compare` is unusable: a missing dataset file or field, a baseline that is not among the
    variants, or an output folder holding runs of a different configuration."""
