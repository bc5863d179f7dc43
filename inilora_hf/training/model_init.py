"""`inilora_init`: the `model_init` callable handed to `transformers.Trainer` and `inilora_hf.SFTTrainer`."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from inilora_hf.adapters.apply import wrap_with_factors
from inilora_hf.adapters.quantized import layer_settings, quantization_ready
from inilora_hf.factorsets.cache import get_or_build
from inilora_hf.factorsets.checkpoint_files import (
    check_model_location,
    load_pretrained,
    model_reference,
)
from inilora_hf.factorsets.compute import compute_factor_set, default_device
from inilora_hf.factorsets.factor_set import FactorSet
from inilora_hf.factorsets.fingerprint import cache_key, model_key, weight_fingerprint
from inilora_hf.factorsets.fingerprint_memo import (
    checkpoint_identity,
    target_fingerprints,
)
from inilora_hf.factorsets.targets import check_rank, find_target_linears, read_weight
from inilora_hf.log import get_logger
from inilora_hf.variants import get_variant
from inilora_hf.variants.config import InitConfig, normalize_targets

from .calibration import CalibrationSource, calibrate, estimate_gradients
from .init_metadata import attach_init_metadata

logger = get_logger(__name__)


class InitFunction:
    """Builds a fresh `peft.PeftModel` with the configured LoRA init on every call.

    Created by `inilora_init`; see there. The factor set is computed (or loaded) on the first call and reused
    by every later call, so `Trainer.train()` re-initialisations and hyper-parameter trials cost one model load.

    Attributes:
        config: The resolved `InitConfig`.
        factor_set: The `FactorSet` in use (None until the first call or `prepare()`).
        factor_source: Where it came from: `"computed"`, `"cache:<key>"`, `"given"`, or the directory / repo id.
    """

    def __init__(
        self,
        model: str | os.PathLike | PreTrainedModel,
        config: InitConfig,
        *,
        factors: FactorSet | str | os.PathLike | None,
        model_class: type | None,
        model_kwargs: dict[str, Any],
        lora_kwargs: dict[str, Any],
        strict: bool,
        device: torch.device | str | None,
        max_group_bytes: int | None,
        revision: str | None,
        requested: dict[str, Any] | None = None,
        use_cache: bool = True,
        cache_dir: str | os.PathLike | None = None,
        quantization_options: dict[str, Any] | None = None,
        calibration: CalibrationSource | None = None,
    ) -> None:
        if isinstance(model, PeftModel):
            raise TypeError(
                "inilora_init needs the base model, not a PeftModel: pass `peft_model.get_base_model()` before any "
                "adapter was added, or the model's Hub id / directory."
            )
        if not isinstance(model, (str, os.PathLike, nn.Module)):
            raise TypeError(f"`model` must be a Hub id, a directory or a loaded model, got {type(model).__name__}.")
        if isinstance(model, (str, os.PathLike)):
            check_model_location(model)
        self.config = config
        self.factor_set: FactorSet | None = factors if isinstance(factors, FactorSet) else None
        self._factors_source = None if isinstance(factors, FactorSet) else factors
        self._model = model
        self._model_class = model_class or AutoModelForCausalLM
        self._model_kwargs = model_kwargs
        self._lora_kwargs = lora_kwargs
        self._strict = strict
        self._device = device
        self._max_group_bytes = max_group_bytes
        self._revision = revision
        self.factor_source = "given" if self.factor_set is not None else ""
        self._requested = requested or {}
        self._verified = False
        self._use_cache = use_cache
        self._quantization_options = quantization_options or {}
        self._cache_dir = cache_dir
        self._calibration = calibration or CalibrationSource()
        self._default_calibration: CalibrationSource | None = None
        self._default_eta: float | None = None

    @property
    def base_model_name(self) -> str | None:
        """The base model's Hub id, or a local directory's absolute path (for a loaded model, its
        `config._name_or_path`, made absolute if it names a local directory)."""
        if isinstance(self._model, nn.Module):
            name = getattr(getattr(self._model, "config", None), "_name_or_path", None)
            return model_reference(name) if name else None
        return model_reference(self._model)

    @property
    def revision(self) -> str | None:
        """The revision `load_base_model` loads the base at (`model_kwargs["revision"]` wins, as in `from_pretrained`)."""
        return self._model_kwargs.get("revision", self._revision)

    @property
    def needs_calibration_data(self) -> bool:
        """True for a data-driven variant that still has to be computed and was given no `calibration_data`
        (a trainer can then offer its train dataset with `set_default_calibration`)."""
        return (
            self.factor_set is None
            and self._factors_source is None
            and get_variant(self.config.variant).needs_gradients
            and self._calibration.data is None
        )

    def set_default_calibration(
        self,
        data: Any,
        *,
        batch_size: int | None = None,
        collate_fn: Any = None,
        eta: float | None = None,
    ) -> None:
        """Calibration data (and `eta`) to use when `inilora_init` was given none: a trainer's train dataset,
        collator, per-device batch size and first-step learning rate. Explicit `calibration_data=`,
        `calibration_batch_size=` and `eta=` arguments take precedence; `calibration_samples=` applies to this
        data too. Called by `inilora_hf.SFTTrainer` before it calls `model_init`.

        Example:
            >>> init.set_default_calibration(tokenized_train, batch_size=8, collate_fn=collator, eta=1e-5)   # doctest: +SKIP
        """
        self._default_calibration = CalibrationSource(
            data, samples=self._calibration.samples, batch_size=self._calibration.batch_size or batch_size,
            collate_fn=collate_fn,
        )
        self._default_eta = eta

    def load_base_model(self) -> nn.Module:
        """A fresh, unmodified copy of the base model (loaded from disk/Hub, or deep-copied).

        Raises:
            BaseModelNotFoundError: no such local directory, Hub repo or revision, or not cached while offline.
        """
        if isinstance(self._model, nn.Module):
            return copy.deepcopy(self._model)
        kwargs = dict(self._model_kwargs)
        if self._revision is not None:
            kwargs.setdefault("revision", self._revision)
        return load_pretrained(self._model_class, self._model, **kwargs)

    def prepare(self, base: nn.Module | None = None) -> FactorSet:
        """Resolve the factor set (load the given one, or compute it) without building a PEFT model.

        `base`: an already-loaded, unmodified copy of the base model (default: load one)."""
        if not self._verified:
            self._resolve(*((base, None) if base is not None else self._load_identified()))
        return self.factor_set

    def _load_identified(self) -> tuple[nn.Module, dict[str, Any] | None]:
        """A fresh base model, and the identity of the checkpoint files it was loaded from (it lets a cache hit
        reuse remembered fingerprints; see `fingerprint_memo`). A local directory's files must be the same
        before and after the load; a Hub snapshot's files are immutable content-addressed blobs."""
        if not self._use_cache:
            return self.load_base_model(), None
        kwargs = {"revision": self._revision, "model_kwargs": self._model_kwargs}
        local = isinstance(self._model, (str, os.PathLike)) and Path(self._model).expanduser().is_dir()
        before = checkpoint_identity(self._model, **kwargs) if local else None
        base = self.load_base_model()
        after = checkpoint_identity(self._model, **kwargs)
        return base, after if not local or before == after else None

    def _resolve(self, base: nn.Module, checkpoint: dict[str, Any] | None) -> None:
        if self._verified:
            return
        weights, fingerprints = self._reference_weights(base, checkpoint)
        if self.factor_set is None and self._factors_source is not None:
            self.factor_set = FactorSet.from_pretrained(self._factors_source)
            self.factor_source = str(self._factors_source)
        if self.factor_set is None:
            self.factor_set, self.factor_source = self._compute_or_load_cached(weights, fingerprints, base)
        else:
            self._check_factor_set(fingerprints)
            if self.config.quantization is not None and not self.factor_set.has_residual:
                # A full-precision factor set on a quantized base: derive the quantization-ready one (a copy).
                self.factor_set = replace(
                    self.factor_set,
                    config=self.config,
                    factors=quantization_ready(self.factor_set.factors, weights, self.config),
                )
        self._verified = True

    def _reference_weights(
        self, base: nn.Module, checkpoint: dict[str, Any] | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
        """fp32 target weights W0 and their fingerprints (remembered per `checkpoint` identity where possible).
        For a bitsandbytes base, W0 is the full-precision checkpoint (loaded once, targets only kept) and the
        config records the layers' quantization settings."""
        modules = find_target_linears(base, self.config.target_modules)
        check_rank(modules, self.config.rank)
        settings = [layer_settings(m) for m in modules.values()]
        if settings[0]["bits"] is None:
            fingerprints = target_fingerprints(modules, checkpoint, cache_dir=self._cache_dir)
            return {n: read_weight(m) for n, m in modules.items()}, fingerprints
        if any(s != settings[0] for s in settings):
            raise ValueError("The target layers of this quantized model use different quantization settings.")
        self.config = replace(self.config, quantization={**settings[0], **self._quantization_options})
        if isinstance(self._model, nn.Module):
            logger.warning(
                "The base model is already quantized: the factors are computed from its dequantized weights. Pass "
                "the model's id or directory with `quantization_config=` to compute them from full precision."
            )
            weights = {n: read_weight(m) for n, m in modules.items()}
        else:
            kwargs = {k: v for k, v in self._model_kwargs.items() if k not in ("quantization_config", "device_map")}
            kwargs.update(dtype=torch.float32, revision=self.revision)
            full = load_pretrained(self._model_class, self._model, **kwargs)
            weights = {n: read_weight(m).clone() for n, m in find_target_linears(full, self.config.target_modules).items()}
            del full
        return weights, {n: weight_fingerprint(w) for n, w in weights.items()}

    def _compute_or_load_cached(
        self, weights: dict[str, torch.Tensor], fingerprints: dict[str, dict], base: nn.Module
    ) -> tuple[FactorSet, str]:
        """Compute the factor set, through the local cache unless `use_cache=False`.

        For a data-driven variant the calibration samples are read first and their identity (and a derived
        `eta`) enters the config, hence the cache key; the gradient pass on `base` runs only on a cache miss."""
        calibration = None
        if get_variant(self.config.variant).needs_gradients:
            source = self._calibration if self._calibration.data is not None else self._default_calibration
            self.config, calibration = calibrate(self.config, source, base, default_eta=self._default_eta)

        def compute() -> FactorSet:
            factor_set = compute_factor_set(
                weights,
                self.config,
                fingerprints=fingerprints,
                base_model=self.base_model_name,
                base_revision=self.revision,
                device=self._device if self._device is not None else default_device(),
                gradients=None if calibration is None else estimate_gradients(
                    base, calibration.batches, list(weights), sample_counts=calibration.sample_counts
                ),
                max_group_bytes=self._max_group_bytes,
            )
            if self.config.quantization is not None:
                factor_set.factors = quantization_ready(factor_set.factors, weights, self.config)
            return factor_set

        if not self._use_cache:
            return compute(), "computed"
        computed: list[FactorSet] = []
        key = cache_key(model_key(fingerprints), self.config)

        def build(directory: Path) -> None:
            computed.append(compute())
            computed[0].save_pretrained(directory)

        lookup = get_or_build(key, build, cache_dir=self._cache_dir)
        if computed:
            logger.info("Computed factor set and stored it in the cache: %s", lookup.path)
            return computed[0], "computed"
        logger.info("Cache hit for %s (%s): loaded %s, no fitting.", self.base_model_name, self.config.variant, lookup.path)
        # get_or_build has just checked every file of the entry against its sha256 manifest.
        return FactorSet.from_pretrained(lookup.path, verify_checksums=False), f"cache:{key}"

    def _check_factor_set(self, fingerprints: dict[str, dict]) -> None:
        stored = self.factor_set.config
        for field, value in self._requested.items():
            if getattr(stored, field) != value:
                raise ValueError(
                    f"The factor set was computed with {field}={getattr(stored, field)!r}, but inilora_init was "
                    f"called with {field}={value!r}. Drop the argument, or compute a new factor set (factors=None)."
                )
        requested_quantization = self.config.quantization
        if stored.quantization is not None and requested_quantization != stored.quantization:
            raise ValueError(
                f"The factor set was computed for a quantized base with {stored.quantization}, but this model's "
                f"target layers use {requested_quantization}. Load the model with the same BitsAndBytesConfig "
                "(and refine_steps / adapter_dtype), or compute a new factor set (factors=None)."
            )
        self.config = replace(stored, quantization=requested_quantization)
        if self._strict:
            self.factor_set.check_compatible(fingerprints)

    def __call__(self, trial: Any = None) -> PeftModel:
        """Return a new `PeftModel` ready to train (`trial` from hyper-parameter search is accepted)."""
        base, checkpoint = (self.load_base_model(), None) if self._verified else self._load_identified()
        self._resolve(base, checkpoint)
        model = wrap_with_factors(
            base, self.factor_set, source=self.factor_source, revision=self.revision, **self._lora_kwargs
        )
        return attach_init_metadata(model)


def inilora_init(
    model: str | os.PathLike | PreTrainedModel,
    *,
    variant: str | None = None,
    rank: int | None = None,
    lora_alpha: float | None = None,
    use_rslora: bool | None = None,
    target_modules: Sequence[str] | str | None = None,
    factors: FactorSet | str | os.PathLike | None = None,
    model_class: type | None = None,
    dtype: torch.dtype | str | None = None,
    torch_dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    lora_dropout: float = 0.0,
    lora_config_kwargs: dict[str, Any] | None = None,
    strict: bool = True,
    device: torch.device | str | None = None,
    max_group_bytes: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    quantization_config: Any = None,
    refine_steps: int = 0,
    adapter_dtype: str = "bfloat16",
    calibration_data: Any = None,
    calibration_samples: int | None = None,
    calibration_batch_size: int | None = None,
    **options: Any,
) -> InitFunction:
    """Create a `model_init` callable that returns a LoRA `PeftModel` initialised with `variant`.

    Args:
        model: A Hub id, a local directory, or an already-loaded `PreTrainedModel` (deep-copied on each call,
            so the object you pass is never modified).
        variant: An init variant name (`inilora`, `inilora-alpha`, `inilora-beta`, `pissa`, `milora`, `lora`,
            `gaussian`, `lora-sb` (data-driven), or one registered with `register_variant`).
        rank: LoRA rank (default 8). With `factors=`, defaults to the factor set's.
        lora_alpha: LoRA alpha (default: `rank`, i.e. scaling 1 as in the IniLoRA recipes).
        use_rslora: Rank-stabilised scaling.
        target_modules: Module names/suffixes, a regex string, or `"all-linear"` (default `["q_proj", "v_proj"]`).
        factors: A `FactorSet`, a directory, or a Hub repo id holding one; None computes it.
        model_class: Class used to load `model` from a path (default `AutoModelForCausalLM`; e.g.
            `AutoModelForSequenceClassification`).
        dtype: Dtype to load the model in (transformers' `dtype`; `torch_dtype` is accepted as an alias).
        revision: Revision of `model` on the Hub.
        model_kwargs: Extra keyword arguments for `from_pretrained`.
        lora_dropout: `LoraConfig.lora_dropout`.
        lora_config_kwargs: Other `LoraConfig` fields (e.g. `task_type`, `modules_to_save`, `bias`).
        strict: Refuse a factor set whose recorded base-weight fingerprint differs from the model's.
        device: Where to compute the factors (default: CUDA if available, else CPU).
        max_group_bytes: Memory bound for one batched group of same-shape matrices during the fit.
        cache_dir: Local factor-set cache (default `$INILORA_HF_CACHE`, else `$HF_HOME/inilora`).
        quantization_config: A `transformers.BitsAndBytesConfig` to load the base in 4 or 8 bit (QLoRA). The factors
            are computed from the full-precision weights; the residual is computed in fp32 and quantized with the
            layers' own settings. A model already loaded in 4/8 bit works too (factors from dequantized weights).
        refine_steps: Quantized bases only: LoftQ-style rounds alternating `Q(R)` and a refit of B, A to
            `W0 − Q(R)`, so that `Q(R) + s·B·A` approaches `W0` (0 = one-shot requantization).
        adapter_dtype: Quantized bases only: the dtype LoRA factors train in (QLoRA and TRL use bf16); the factors
            are rounded to it before `R` is computed, so `R + s·B·A` holds for the values that train.
        use_cache: Look up / store computed factor sets in the cache (keyed by base weights + config). Concurrent
            processes (e.g. the ranks of a `torchrun` job) compute a key once; the others wait and load it.
        calibration_data: Data-driven variants (`lora-sb`): tokenized rows (a `datasets.Dataset`, a list of dicts
            with `input_ids` and optionally `attention_mask` / `labels`) or model-input batches (a `DataLoader`).
            With `inilora_hf.SFTTrainer(model_init=...)` it defaults to the trainer's prepared train dataset.
            The sha256 of the exact samples used is recorded in `options["calibration"]` (part of the cache key).
        calibration_samples: Use exactly this many samples, the first ones in order (default: up to 64).
        calibration_batch_size: Rows per gradient batch for row data (default: the trainer's per-device batch
            size, else 8). Each batch's loss is divided by its sample count, as in LoRA-SB's code.
        **options: Variant options, e.g. `steps=20000, lr=5e-4, seed=0` (inilora), `sigma=0.5`
            (inilora-alpha), `kaiming="uniform"` (inilora-beta), `eta=1e-5` (lora-sb: the first optimizer
            step's learning rate; `inilora_hf.SFTTrainer` derives it from its arguments when not given).

    Returns:
        An `InitFunction`; call it (or let a Trainer call it) to get a `PeftModel` with `.factor_set` and
        `.init_report`.

    Raises:
        BaseModelNotFoundError: `model` is written as a path (`./x`, `/x`, `~/x`, `a/b/c`) but is no directory;
            a Hub id that does not exist, or is not cached while offline, raises it on the first call.

    Example:
        >>> from inilora_hf import inilora_init, SFTTrainer
        >>> init = inilora_init("meta-llama/Llama-2-7b-hf", variant="inilora", rank=8)   # doctest: +SKIP
        >>> trainer = SFTTrainer(model_init=init, args=SFTConfig("out"), train_dataset=ds)  # doctest: +SKIP
    """
    if dtype is not None and torch_dtype is not None:
        raise ValueError("Pass `dtype` or its alias `torch_dtype`, not both.")
    dtype = dtype if dtype is not None else torch_dtype
    model_kwargs = dict(model_kwargs or {})
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    if quantization_config is not None:
        model_kwargs["quantization_config"] = quantization_config
        model_kwargs.setdefault("device_map", {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu")
    requested = {
        field: value
        for field, value in {
            "variant": variant, "rank": rank, "lora_alpha": lora_alpha, "use_rslora": use_rslora,
            "target_modules": None if target_modules is None else normalize_targets(target_modules),
        }.items()
        if value is not None
    }
    if factors is not None and not isinstance(factors, FactorSet) and not Path(factors).is_dir():
        factors = str(factors)  # a Hub repo id, downloaded on first use
    stored = factors.config if isinstance(factors, FactorSet) else None
    config = stored or InitConfig(
        variant=variant or "inilora",
        rank=8 if rank is None else rank,
        lora_alpha=lora_alpha,
        use_rslora=bool(use_rslora),
        target_modules=("q_proj", "v_proj") if target_modules is None else target_modules,
        options=options,
    )
    init = InitFunction(
        model,
        config,
        factors=factors,
        model_class=model_class,
        model_kwargs=model_kwargs,
        lora_kwargs={"lora_dropout": lora_dropout, **(lora_config_kwargs or {})},
        strict=strict,
        device=device,
        max_group_bytes=max_group_bytes,
        revision=revision,
        requested=requested if factors is not None else None,
        use_cache=use_cache,
        cache_dir=cache_dir,
        quantization_options={"refine_steps": refine_steps, "adapter_dtype": adapter_dtype},
        calibration=CalibrationSource(calibration_data, calibration_samples, calibration_batch_size),
    )
    if calibration_data is not None and (factors is not None or not get_variant(config.variant).needs_gradients):
        raise ValueError(
            f"`calibration_data` has no effect with {'`factors=`' if factors is not None else f'variant {config.variant!r}'}: "
            "only data-driven variants (e.g. 'lora-sb') computed here use it. Drop it."
        )
    if factors is not None and options:
        raise ValueError(
            f"Variant options {sorted(options)} have no effect with `factors=`: the factor set fixes them. "
            "Drop them, or compute a new factor set (factors=None)."
        )
    return init
