"""The factor-set format: tensors and metadata of `FactorSetData` (the local half of `FactorSet`), safetensors I/O.

On disk a factor set is a directory of plain safetensors (`factors.safetensors`, or shards with
`factors.safetensors.index.json`) and one JSON file (`inilora_factors.json`) with the `InitConfig`, the base
model's identity and per-module fingerprint, fit statistics, per-file checksums and versions. No pickle.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import huggingface_hub
import peft
import torch
import transformers
from huggingface_hub import save_torch_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file

from inilora_hf._version import __version__
from inilora_hf.errors import (
    FactorSetCorruptError,
    FactorSetFormatError,
    FactorSetMismatchError,
)
from inilora_hf.hub.transport import file_sha256
from inilora_hf.variants import ModuleFactors
from inilora_hf.variants.config import InitConfig

from .fingerprint import fingerprint_difference, model_key

METADATA_NAME = "inilora_factors.json"
WEIGHTS_PATTERN = "factors{suffix}.safetensors"
FORMAT_VERSION = 1
RESIDUAL_KEY = "residual"
_FactorSetT = TypeVar("_FactorSetT", bound="FactorSetData")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that produced a file, recorded for provenance."""
    return {
        "inilora_hf": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "huggingface_hub": huggingface_hub.__version__,
        "python": platform.python_version(),
    }


def _standalone(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor owning its storage (slices of a batched fit share one; safetensors refuses that)."""
    tensor = tensor.detach().to("cpu").contiguous()
    return tensor if tensor.untyped_storage().nbytes() == tensor.nbytes else tensor.clone()


@dataclass
class FactorSetData:
    """Initial A/B factors (and optionally the residual) for every target module of one base model.

    Attributes:
        config: The `InitConfig` the factors were computed with.
        factors: Module name (as in the plain transformers model) → `ModuleFactors` (fp32 `lora_A`, `lora_B`,
            optional variant extras). A stored residual lives in `extra["residual"]`.
        fingerprints: Module name → fingerprint of the base weight the factors were computed from.
        base_model: The base model's Hub id or path, as given.
        base_revision: The resolved commit hash when the base came from the Hub.
        stats: Module name → fit statistics (`mse`, and for weight-approximating variants `optimal_mse`,
            `mse_ratio`).
        info: Free-form provenance (compute device, seconds, library versions, creation time, source repo).

    Example:
        >>> fs = FactorSet.from_pretrained("./factors/llama-inilora-r8")        # doctest: +SKIP
        >>> fs.config.variant, len(fs.factors)                                    # doctest: +SKIP
        ('inilora', 64)
        >>> fs.save_pretrained("./copy")                                          # doctest: +SKIP
    """

    config: InitConfig
    factors: dict[str, ModuleFactors]
    fingerprints: dict[str, dict[str, Any]]
    base_model: str | None = None
    base_revision: str | None = None
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def model_key(self) -> str:
        """Digest of the exact base weights; with `config.config_hash()` it forms the cache key."""
        return model_key(self.fingerprints)

    @property
    def has_residual(self) -> bool:
        """Whether the residual `R` is stored (needed for quantized bases, where it cannot be recomputed)."""
        return any(RESIDUAL_KEY in f.extra for f in self.factors.values())

    @property
    def variant_extras(self) -> set[str]:
        """Names of variant-specific tensors (e.g. a LoRA-XS `lora_core`) beyond A, B and the residual; when there
        are none, the factors are exactly a standard LoRA adapter (and the Hub repo gets `init_adapter/`)."""
        return {key for module in self.factors.values() for key in module.extra if key != RESIDUAL_KEY}

    def check_compatible(self, fingerprints: dict[str, dict[str, Any]]) -> None:
        """Raise `FactorSetMismatchError` naming the first module whose base weight differs.

        `fingerprints` are those of the model about to receive the factors. Weights equal up to dtype
        rounding (the same checkpoint loaded in bf16) are accepted.
        """
        missing = sorted(set(self.factors) - set(fingerprints))
        extra = sorted(set(fingerprints) - set(self.factors))
        if missing or extra:
            raise FactorSetMismatchError(
                f"The factor set for {self.base_model or 'an unnamed base'} covers modules that do not match the "
                f"model's targets (missing in the model: {missing[:3]}, not in the factor set: {extra[:3]}). "
                "Use the same `target_modules` and base model the factor set was computed for "
                f"({self.config.target_modules!r}), or compute a new one (factors=None)."
            )
        for name in sorted(self.factors):
            problem = fingerprint_difference(self.fingerprints[name], fingerprints[name])
            if problem:
                raise FactorSetMismatchError(
                    f"Module {name!r} of this model has {problem}: the factor set was computed for base model "
                    f"{self.base_model or '<unknown>'} (revision {self.base_revision or 'unknown'}). Load the "
                    "matching base model, compute a new factor set (factors=None), or pass strict=False to apply "
                    "it anyway (shapes must still match)."
                )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat `{f"{module}.lora_A": ..., f"{module}.lora_B": ..., f"{module}.<extra>": ...}` of contiguous tensors."""
        tensors = {}
        for name, module in self.factors.items():
            tensors[f"{name}.lora_A"] = _standalone(module.lora_A)
            tensors[f"{name}.lora_B"] = _standalone(module.lora_B)
            for key, value in module.extra.items():
                tensors[f"{name}.{key}"] = _standalone(value)
        return tensors

    def metadata(self) -> dict[str, Any]:
        """The JSON document written next to the tensors (without the per-file checksums)."""
        return {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "base_model": self.base_model,
            "base_revision": self.base_revision,
            "modules": self.fingerprints,
            "stats": self.stats,
            "info": self.info,
        }

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        include_residual: bool | None = None,
        max_shard_size: int | str = "2GB",
    ) -> Path:
        """Write the factor set as safetensors + `inilora_factors.json` into `save_directory`.

        Args:
            save_directory: Created if needed. Existing factor files in it are replaced.
            include_residual: Keep stored residuals (default: keep them if present). `False` drops them; they
                are recomputed exactly from the base weights on load for full-precision bases.
            max_shard_size: Shard the tensors past this size (an index file is written).

        Example:
            >>> model = inilora_init("./base", variant="inilora")()                 # doctest: +SKIP
            >>> model.factor_set.save_pretrained("./factors")                        # doctest: +SKIP
        """
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = self.state_dict()
        if include_residual is False:
            tensors = {k: v for k, v in tensors.items() if not k.endswith(f".{RESIDUAL_KEY}")}
        for stale in directory.glob("factors*.safetensors*"):
            stale.unlink()
        save_torch_state_dict(
            tensors,
            directory,
            filename_pattern=WEIGHTS_PATTERN,
            max_shard_size=max_shard_size,
            # One key only: safetensors writes metadata keys in random order, and identical factor sets must give
            # byte-identical files (checksums, no-op Hub pushes).
            metadata={"format": "pt"},
        )
        files = sorted(p.name for p in directory.glob("factors*.safetensors*"))
        document = self.metadata()
        document["files"] = {name: file_sha256(directory / name) for name in files}
        tmp = directory / f".{METADATA_NAME}.tmp"
        tmp.write_text(json.dumps(document, indent=2, sort_keys=True))
        os.replace(tmp, directory / METADATA_NAME)
        return directory

    @classmethod
    def _load_directory(cls: type[_FactorSetT], path: Path, *, verify_checksums: bool = True) -> _FactorSetT:
        document = read_metadata(path)
        tensors: dict[str, torch.Tensor] = {}
        for name, digest in sorted(document["files"].items()):
            file = path / name
            if not file.is_file():
                raise FactorSetCorruptError(
                    f"{file} is missing; the factor set in {path} is incomplete. Copy or download it again."
                )
            if verify_checksums and file_sha256(file) != digest:
                raise FactorSetCorruptError(
                    f"{file} does not match the checksum recorded in {METADATA_NAME} (truncated or altered). "
                    "Delete the directory and copy, download or compute the factor set again."
                )
            if name.endswith(".safetensors"):
                try:
                    tensors.update(load_file(file))
                except SafetensorError as error:
                    raise FactorSetCorruptError(f"{file} is not a readable safetensors file: {error}") from error
        fingerprints = document["modules"]
        factors = {}
        for module in fingerprints:
            try:
                lora_A = tensors.pop(f"{module}.lora_A")
                lora_B = tensors.pop(f"{module}.lora_B")
            except KeyError as error:
                raise FactorSetCorruptError(
                    f"{path} has no tensor {error.args[0]!r}; the factor set is incomplete."
                ) from None
            prefix = f"{module}."
            extra = {k[len(prefix) :]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}
            factors[module] = ModuleFactors(lora_A, lora_B, extra)
        return cls(
            config=InitConfig.from_dict(document["config"]),
            factors=factors,
            fingerprints=fingerprints,
            base_model=document.get("base_model"),
            base_revision=document.get("base_revision"),
            stats=document.get("stats", {}),
            info=document.get("info", {}),
        )


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate `inilora_factors.json` in `path` (format version, required keys)."""
    file = Path(path) / METADATA_NAME
    if not file.is_file():
        raise FactorSetCorruptError(
            f"No {METADATA_NAME} in {path}: this is not an inilora_hf factor set, or it was only partly copied."
        )
    try:
        document = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise FactorSetCorruptError(f"{file} is not valid JSON ({error}); the factor set is corrupted.") from error
    version = document.get("format_version")
    if not isinstance(version, int):
        raise FactorSetFormatError(f"{file} has no integer `format_version`; it was not written by inilora_hf.")
    if version > FORMAT_VERSION:
        raise FactorSetFormatError(
            f"{file} uses factor-set format version {version}, but this inilora_hf reads up to {FORMAT_VERSION}. "
            "Upgrade: `pip install -U inilora_hf`."
        )
    for key in ("config", "modules", "files"):
        if key not in document:
            raise FactorSetFormatError(f"{file} lacks the required key {key!r}.")
    return document


def now_iso() -> str:
    """The current UTC time in ISO 8601, for provenance fields."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
