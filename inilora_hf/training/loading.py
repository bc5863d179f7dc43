"""The base model `inilora_init` starts from: which objects it accepts, how it is loaded, what it is called, and
the identity of the checkpoint files a load read (which lets a cache hit reuse remembered fingerprints)."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM

from inilora_hf.factorsets.checkpoint_files import (
    check_model_location,
    load_pretrained,
    model_reference,
)
from inilora_hf.factorsets.fingerprint_memo import checkpoint_identity

BaseModel = str | os.PathLike | nn.Module
"""A Hub id, a local directory, or an already-loaded model."""


def check_base_model(model: Any) -> None:
    """Raise unless `model` can be the base of `inilora_init`: a loaded model without adapters, a Hub id, or an
    existing directory.

    Raises:
        TypeError: `model` is a `PeftModel`, or not a Hub id, a directory or a module.
        BaseModelNotFoundError: `model` is written as a path (`./x`, `/x`, `~/x`, `a/b/c`) but is no directory.

    Example:
        >>> check_base_model("org/name")   # a Hub id: checked on load
    """
    if isinstance(model, PeftModel):
        raise TypeError(
            "inilora_init needs the base model, not a PeftModel: pass `peft_model.get_base_model()` before any "
            "adapter was added, or the model's Hub id / directory."
        )
    if not isinstance(model, (str, os.PathLike, nn.Module)):
        raise TypeError(f"`model` must be a Hub id, a directory or a loaded model, got {type(model).__name__}.")
    if isinstance(model, (str, os.PathLike)):
        check_model_location(model)


def base_model_name(model: BaseModel) -> str | None:
    """The base model's Hub id, or a local directory's absolute path (for a loaded model, its
    `config._name_or_path`, made absolute if it names a local directory; None if it has none).

    Example:
        >>> base_model_name("org/name")
        'org/name'
    """
    if isinstance(model, nn.Module):
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
        return model_reference(name) if name else None
    return model_reference(model)


@dataclass(frozen=True)
class ModelLoading:
    """How `InitFunction` loads its base model from a Hub id or a directory.

    Attributes:
        model_class: Class whose `from_pretrained` loads the model (default `AutoModelForCausalLM`).
        model_kwargs: Keyword arguments for `from_pretrained`, `dtype` / `quantization_config` / `device_map`
            included (see `from_arguments`).
        revision: Revision of the model on the Hub; `model_kwargs["revision"]` wins, as in `from_pretrained`.

    Example:
        >>> loading = ModelLoading.from_arguments(dtype=torch.bfloat16, revision="main")
        >>> loading.model_kwargs, loading.resolved_revision
        ({'dtype': torch.bfloat16}, 'main')
    """

    model_class: type = AutoModelForCausalLM
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    revision: str | None = None

    @classmethod
    def from_arguments(
        cls,
        *,
        model_class: type | None = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        revision: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        quantization_config: Any = None,
    ) -> ModelLoading:
        """The loading options from `inilora_init`'s keyword arguments: `dtype` (or its alias `torch_dtype`) and
        `quantization_config` go into `model_kwargs`; a quantized load defaults to `device_map` on the current
        CUDA device, else the CPU.

        Raises:
            ValueError: Both `dtype` and `torch_dtype` are given.

        Example:
            >>> ModelLoading.from_arguments(torch_dtype="float16").model_kwargs
            {'dtype': 'float16'}
        """
        if dtype is not None and torch_dtype is not None:
            raise ValueError("Pass `dtype` or its alias `torch_dtype`, not both.")
        dtype = dtype if dtype is not None else torch_dtype
        kwargs = dict(model_kwargs or {})
        if dtype is not None:
            kwargs["dtype"] = dtype
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
            kwargs.setdefault("device_map", {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu")
        return cls(model_class=model_class or AutoModelForCausalLM, model_kwargs=kwargs, revision=revision)

    @property
    def resolved_revision(self) -> str | None:
        """The revision a load uses: `model_kwargs["revision"]`, else `revision`."""
        return self.model_kwargs.get("revision", self.revision)

    def load(self, model: BaseModel) -> nn.Module:
        """A fresh, unmodified copy of the base model (loaded from disk/Hub, or deep-copied).

        Raises:
            BaseModelNotFoundError: no such local directory, Hub repo or revision, or not cached while offline.

        Example:
            >>> base = ModelLoading(model_kwargs={"dtype": torch.float32}).load("./base")   # doctest: +SKIP
        """
        if isinstance(model, nn.Module):
            return copy.deepcopy(model)
        kwargs = dict(self.model_kwargs)
        if self.revision is not None:
            kwargs.setdefault("revision", self.revision)
        return load_pretrained(self.model_class, model, **kwargs)

    def load_full_precision(self, model: str | os.PathLike) -> nn.Module:
        """The model loaded in fp32 without quantization (and without `device_map`), e.g. to read the
        full-precision weights of a base that trains in 4 bit.

        Example:
            >>> loading = ModelLoading.from_arguments(quantization_config=bnb)   # doctest: +SKIP
            >>> full = loading.load_full_precision("./base")                   # doctest: +SKIP
        """
        kwargs = {k: v for k, v in self.model_kwargs.items() if k not in ("quantization_config", "device_map")}
        kwargs.update(dtype=torch.float32, revision=self.resolved_revision)
        return load_pretrained(self.model_class, model, **kwargs)

    def load_identified(self, model: BaseModel) -> tuple[nn.Module, dict[str, Any] | None]:
        """`load(model)`, and the identity of the checkpoint files it was loaded from (see `fingerprint_memo`), or
        None when it cannot be trusted. A local directory's files must be the same before and after the load; a
        Hub snapshot's files are immutable content-addressed blobs.

        Example:
            >>> base, identity = ModelLoading().load_identified("./base")   # doctest: +SKIP
        """
        local = isinstance(model, (str, os.PathLike)) and Path(model).expanduser().is_dir()
        before = checkpoint_identity(model, revision=self.revision, model_kwargs=self.model_kwargs) if local else None
        base = self.load(model)
        after = checkpoint_identity(model, revision=self.revision, model_kwargs=self.model_kwargs)
        return base, after if not local or before == after else None
