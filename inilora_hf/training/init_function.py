"""`InitFunction`: the `model_init` callable `inilora_init` returns. It resolves the factor set once (given, cached
or computed) and builds a fresh `PeftModel` with it on every call."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from inilora_hf.adapters.apply import wrap_with_factors
from inilora_hf.adapters.quantized import layer_settings, quantization_ready
from inilora_hf.factorsets.cache import get_or_build
from inilora_hf.factorsets.compute import compute_factor_set, default_device
from inilora_hf.factorsets.distributed import compute_across_ranks, current_ranks
from inilora_hf.factorsets.factor_set import FactorSet
from inilora_hf.factorsets.fingerprint import cache_key, model_key, weight_fingerprint
from inilora_hf.factorsets.fingerprint_memo import target_fingerprints
from inilora_hf.factorsets.targets import check_rank, default_target_modules, find_target_linears, read_weight
from inilora_hf.log import get_logger
from inilora_hf.variants import get_variant
from inilora_hf.variants.config import InitConfig

from .calibration import CalibrationSource, calibrate, estimate_gradients
from .calibration.peft_pass import peft_data_init
from .init_metadata import attach_init_metadata
from .loading import BaseModel, ModelLoading, base_model_name, check_base_model
from .rank_gradients import estimate_gradients_across_ranks
from .sharding import check_zero3_support, gathered, is_zero3_partitioned

logger = get_logger(__name__)


@dataclass(frozen=True)
class FactorOptions:
    """How `InitFunction` obtains and checks its factor set (see `inilora_init` for each option).

    Attributes:
        strict: Refuse a factor set whose recorded base-weight fingerprints differ from the model's.
        requested: `InitConfig` fields given explicitly together with `factors=`; a given factor set must match them.
        device: Where to compute the factors (None: CUDA if available, else CPU).
        max_group_bytes: Memory bound for one batched group of same-shape matrices during the fit.
        use_cache: Look up / store computed factor sets in the local cache.
        cache_dir: Local factor-set cache (None: the default one).
        refine_steps: Quantized bases only: LoftQ-style refinement rounds.
        adapter_dtype: Quantized bases only: the dtype the LoRA factors train in.
        default_targets: `target_modules` was not given: a computed factor set targets PEFT's default modules for
            the base's model type (`default_target_modules`).
        distributed: Split the computation across the ranks of an initialised process group of more than one
            rank (every rank must then call it); False computes in this process alone.

    Example:
        >>> FactorOptions(use_cache=False, device="cpu").strict
        True
    """

    strict: bool = True
    requested: Mapping[str, Any] = field(default_factory=dict)
    device: torch.device | str | None = None
    max_group_bytes: int | None = None
    use_cache: bool = True
    cache_dir: str | os.PathLike | None = None
    refine_steps: int = 0
    adapter_dtype: str = "bfloat16"
    default_targets: bool = False
    distributed: bool = True


class InitFunction:
    """Builds a fresh `peft.PeftModel` with the configured LoRA init on every call.

    Created by `inilora_init`; see there. The factor set is computed (or loaded) on the first call and reused
    by every later call, so `Trainer.train()` re-initialisations and hyper-parameter trials cost one model load.

    Args:
        model: The base model: a Hub id, a local directory, or a loaded model (deep-copied on each call).
        config: The `InitConfig` to compute factors for (a given factor set's own config wins).
        factors: A `FactorSet`, or a directory / Hub repo id holding one; None computes it.
        loading: How to load `model` from a Hub id or directory (default: `AutoModelForCausalLM`, no options).
        options: How the factor set is obtained and checked (default: strict, cached, computed on CUDA if
            available).
        calibration: Calibration data for data-driven variants.
        lora_kwargs: Further `LoraConfig` fields (e.g. `lora_dropout`, `task_type`).

    Example:
        >>> init = InitFunction("./base", InitConfig(variant="pissa", rank=4),        # doctest: +SKIP
        ...                     loading=ModelLoading(model_kwargs={"dtype": torch.float32}),
        ...                     options=FactorOptions(use_cache=False))
        >>> model = init()                                                            # doctest: +SKIP

    Attributes:
        config: The resolved `InitConfig`.
        factor_set: The `FactorSet` in use (None until the first call or `prepare()`).
        factor_source: Where it came from: `"computed"`, `"cache:<key>"`, `"given"`, or the directory / repo id.
    """

    def __init__(
        self,
        model: BaseModel,
        config: InitConfig,
        *,
        factors: FactorSet | str | os.PathLike | None = None,
        loading: ModelLoading | None = None,
        options: FactorOptions | None = None,
        calibration: CalibrationSource | None = None,
        lora_kwargs: dict[str, Any] | None = None,
    ) -> None:
        check_base_model(model)
        self.config = config
        self.factor_set: FactorSet | None = factors if isinstance(factors, FactorSet) else None
        self._factors_source = None if isinstance(factors, FactorSet) else factors
        self._model = model
        self._loading = loading or ModelLoading()
        self._options = options or FactorOptions()
        self._lora_kwargs = dict(lora_kwargs or {})
        self.factor_source = "given" if self.factor_set is not None else ""
        self._verified = False
        self._calibration = calibration or CalibrationSource()
        self._default_calibration: CalibrationSource | None = None
        self._default_eta: float | None = None
        self._check_zero3()

    @property
    def base_model_name(self) -> str | None:
        """The base model's Hub id, or a local directory's absolute path (for a loaded model, its
        `config._name_or_path`, made absolute if it names a local directory)."""
        return base_model_name(self._model)

    @property
    def revision(self) -> str | None:
        """The revision `load_base_model` loads the base at.

        `model_kwargs["revision"]` wins, as in `from_pretrained`.
        """
        return self._loading.resolved_revision

    @property
    def needs_calibration_data(self) -> bool:
        """True for a data-driven variant that still has to be computed and was given no `calibration_data`
        (a trainer can then offer its train dataset with `set_default_calibration`)."""
        return (
            self.factor_set is None
            and self._factors_source is None
            and get_variant(self.config.variant).needs_calibration
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
            >>> init.set_default_calibration(tokenized_train, batch_size=8,          # doctest: +SKIP
            ...                              collate_fn=collator, eta=1e-5)
        """
        self._default_calibration = CalibrationSource(
            data,
            samples=self._calibration.samples,
            batch_size=self._calibration.batch_size or batch_size,
            collate_fn=collate_fn,
        )
        self._default_eta = eta

    def load_base_model(self) -> nn.Module:
        """A fresh, unmodified copy of the base model (loaded from disk/Hub, or deep-copied).

        Raises:
            BaseModelNotFoundError: no such local directory, Hub repo or revision, or not cached while offline.
        """
        return self._loading.load(self._model)

    def prepare(self, base: nn.Module | None = None) -> FactorSet:
        """Resolve the factor set (load the given one, or compute it) without building a PEFT model.

        `base`: an already-loaded, unmodified copy of the base model (default: load one)."""
        self._check_zero3()
        if not self._verified:
            self._resolve(*((base, None) if base is not None else self._load_identified()))
        return self._resolved_factor_set()

    def _check_zero3(self) -> None:
        """`check_zero3_support` for this init: the given model, a data-driven factor set still to compute, a
        quantized load."""
        check_zero3_support(
            self._model if isinstance(self._model, nn.Module) else None,
            data_driven=self.factor_set is None
            and self._factors_source is None
            and get_variant(self.config.variant).needs_calibration,
            quantized=self._loading.model_kwargs.get("quantization_config") is not None,
        )

    def _resolved_factor_set(self) -> FactorSet:
        """`factor_set`, which `_resolve` has set."""
        assert self.factor_set is not None, "the factor set is resolved before it is used"
        return self.factor_set

    def _load_identified(self) -> tuple[nn.Module, dict[str, Any] | None]:
        """A fresh base model, and the identity of the checkpoint files it was loaded from (it lets a cache hit
        reuse remembered fingerprints; see `fingerprint_memo`), unless `use_cache=False`."""
        if not self._options.use_cache:
            return self.load_base_model(), None
        return self._loading.load_identified(self._model)

    def _resolve(self, base: nn.Module, checkpoint: dict[str, Any] | None) -> None:
        if self._verified:
            return
        if self.factor_set is None and self._factors_source is not None:
            self.factor_set = FactorSet.from_pretrained(self._factors_source)
            self.factor_source = str(self._factors_source)
        if self.factor_set is not None:  # its targets and ranks, not inilora_init's defaults, pick the weights
            self.config = replace(self.factor_set.config, quantization=self.config.quantization)
        elif self._options.default_targets:
            self.config = replace(self.config, target_modules=default_target_modules(base))
        weights, fingerprints = self._reference_weights(base, checkpoint)
        if self.factor_set is None:
            self.factor_set, self.factor_source = self._compute_or_load_cached(weights, fingerprints, base)
            self.config = self.factor_set.config  # with the per-module ranks a data-driven init chose (EVA)
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
        check_rank(modules, self.config)
        settings = [layer_settings(m) for m in modules.values()]
        if settings[0]["bits"] is None:
            # Under DeepSpeed ZeRO-3 every rank gathers the full weights for the block and copies them out of it.
            stored = [m.get_parameter("weight") for m in modules.values()]
            partitioned = any(is_zero3_partitioned(w) for w in stored)
            with gathered(stored):
                fingerprints = target_fingerprints(modules, checkpoint, cache_dir=self._options.cache_dir)
                weights = {n: read_weight(m) for n, m in modules.items()}
                return ({n: w.clone() for n, w in weights.items()} if partitioned else weights), fingerprints
        if any(s != settings[0] for s in settings):
            raise ValueError("The target layers of this quantized model use different quantization settings.")
        refine = {"refine_steps": self._options.refine_steps, "adapter_dtype": self._options.adapter_dtype}
        self.config = replace(self.config, quantization={**settings[0], **refine})
        if isinstance(self._model, nn.Module):
            logger.warning(
                "The base model is already quantized: the factors are computed from its dequantized weights. Pass "
                "the model's id or directory with `quantization_config=` to compute them from full precision."
            )
            weights = {n: read_weight(m) for n, m in modules.items()}
        else:
            full = self._loading.load_full_precision(self._model)
            weights = {
                n: read_weight(m).clone() for n, m in find_target_linears(full, self.config.target_modules).items()
            }
            del full
        return weights, {n: weight_fingerprint(w) for n, w in weights.items()}

    def _compute_or_load_cached(
        self, weights: dict[str, torch.Tensor], fingerprints: dict[str, dict], base: nn.Module
    ) -> tuple[FactorSet, str]:
        """Compute the factor set, through the local cache unless `use_cache=False`.

        For a data-driven variant the calibration samples are read first and their identity (and a derived
        `eta`) enters the config, hence the cache key; the gradient pass or PEFT's data pass (`eva`, `corda`,
        `lora_ga`, which may choose per-module ranks that the stored config then records) on `base` runs only on a
        cache miss."""
        calibration = None
        spec = get_variant(self.config.variant)
        if spec.needs_calibration:
            source = self._calibration if self._calibration.data is not None else self._default_calibration
            self.config, calibration = calibrate(self.config, source, base, default_eta=self._default_eta)

        # PEFT's data passes run whole in one process (the others wait for it through the cache lock).
        ranks = current_ranks() if self._options.distributed and not spec.peft_data_pass else None
        if ranks is not None and self.config.quantization is None:
            return compute_across_ranks(
                ranks,
                weights,
                self.config,
                fingerprints=fingerprints,
                base_model=self.base_model_name,
                base_revision=self.revision,
                device=torch.device(self._options.device) if self._options.device is not None else default_device(),
                gradients=None
                if calibration is None
                else lambda: estimate_gradients_across_ranks(
                    ranks, base, calibration.batches, list(weights), sample_counts=calibration.sample_counts
                ),
                max_group_bytes=self._options.max_group_bytes,
                use_cache=self._options.use_cache,
                cache_dir=None if self._options.cache_dir is None else Path(self._options.cache_dir),
            )

        def compute() -> FactorSet:
            config, harvested = self.config, None
            if spec.peft_data_pass and calibration is not None:
                result = peft_data_init(base, self.config, calibration.batches, weights)
                config, harvested = result.config, result.factors
            factor_set = compute_factor_set(
                weights,
                config,
                fingerprints=fingerprints,
                base_model=self.base_model_name,
                base_revision=self.revision,
                device=self._options.device if self._options.device is not None else default_device(),
                gradients=None
                if calibration is None or not spec.needs_gradients
                else estimate_gradients(
                    base, calibration.batches, list(weights), sample_counts=calibration.sample_counts
                ),
                max_group_bytes=self._options.max_group_bytes,
                harvested=harvested,
            )
            if self.config.quantization is not None:
                factor_set.factors = quantization_ready(factor_set.factors, weights, self.config)
            return factor_set

        if not self._options.use_cache:
            return compute(), "computed"
        computed: list[FactorSet] = []
        key = cache_key(model_key(fingerprints), self.config)

        def build(directory: Path) -> None:
            computed.append(compute())
            # The key of the config before a data pass: EVA's chosen ranks change the stored config, not the key.
            computed[0].info["cache_key"] = key
            computed[0].save_pretrained(directory)

        cache_dir = self._options.cache_dir
        lookup = get_or_build(key, build, cache_dir=None if cache_dir is None else Path(cache_dir))
        if computed:
            logger.info("Computed factor set and stored it in the cache: %s", lookup.path)
            return computed[0], "computed"
        logger.info(
            "Cache hit for %s (%s): loaded %s, no fitting.", self.base_model_name, self.config.variant, lookup.path
        )
        # get_or_build has just checked every file of the entry against its sha256 manifest.
        return FactorSet.from_pretrained(lookup.path, verify_checksums=False), f"cache:{key}"

    def _check_factor_set(self, fingerprints: dict[str, dict]) -> None:
        factor_set = self._resolved_factor_set()
        stored = factor_set.config
        for name, value in self._options.requested.items():
            if getattr(stored, name) != value:
                raise ValueError(
                    f"The factor set was computed with {name}={getattr(stored, name)!r}, but inilora_init was "
                    f"called with {name}={value!r}. Drop the argument, or compute a new factor set (factors=None)."
                )
        requested_quantization = self.config.quantization
        if stored.quantization is not None and requested_quantization != stored.quantization:
            raise ValueError(
                f"The factor set was computed for a quantized base with {stored.quantization}, but this model's "
                f"target layers use {requested_quantization}. Load the model with the same BitsAndBytesConfig "
                "(and refine_steps / adapter_dtype), or compute a new factor set (factors=None)."
            )
        self.config = replace(stored, quantization=requested_quantization)
        if self._options.strict:
            factor_set.check_compatible(fingerprints)

    def __call__(self, trial: Any = None) -> PeftModel:
        """Return a new `PeftModel` ready to train (`trial` from hyper-parameter search is accepted)."""
        self._check_zero3()  # before loading: under ZeRO-3 the load partitions the base
        base, checkpoint = (self.load_base_model(), None) if self._verified else self._load_identified()
        self._resolve(base, checkpoint)
        model = wrap_with_factors(
            base, self._resolved_factor_set(), source=self.factor_source, revision=self.revision, **self._lora_kwargs
        )
        return attach_init_metadata(model)
