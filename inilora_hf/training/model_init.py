"""`inilora_init`: the `model_init` callable handed to `transformers.Trainer` and `inilora_hf.SFTTrainer`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from inilora_hf.errors import TargetModuleError
from inilora_hf.factorsets.factor_set import FactorSet
from inilora_hf.factorsets.targets import FALLBACK_TARGETS, MOE_UNSUPPORTED
from inilora_hf.variants import get_variant
from inilora_hf.variants.config import InitConfig, normalize_targets

from .calibration import CalibrationSource
from .init_function import FactorOptions, InitFunction
from .loading import ModelLoading

# LoraConfig fields that the factor set determines (`lora_config_for`); `lora_config_kwargs` may not set them.
_FACTOR_SET_LORA_FIELDS = frozenset(
    {"r", "lora_alpha", "use_rslora", "target_modules", "rank_pattern", "alpha_pattern"}
)


def inilora_init(
    model: str | os.PathLike | PreTrainedModel,
    *,
    variant: str | None = None,
    rank: int | None = None,
    lora_alpha: float | None = None,
    use_rslora: bool | None = None,
    target_modules: Sequence[str] | str | None = None,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
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
    distributed: bool = True,
    **options: Any,
) -> InitFunction:
    """Create a `model_init` callable that returns a LoRA `PeftModel` initialised with `variant`.

    Args:
        model: A Hub id, a local directory, or an already-loaded `PreTrainedModel` (deep-copied on each call,
            so the object you pass is never modified).
        variant: An init variant name (`inilora`, `inilora-alpha`, `inilora-beta`, `pissa`, `milora`, `lora`,
            `gaussian`, PEFT's own `olora`, `orthogonal`, `pissa_niter`, `mica`, the data-driven `lora-sb`, `eva`,
            `corda`, `lora_ga`, or one registered with `register_variant`).
        rank: LoRA rank (default 8). With `factors=`, defaults to the factor set's.
        lora_alpha: LoRA alpha (default: `rank`, i.e. scaling 1 as in the IniLoRA recipes).
        use_rslora: Rank-stabilised scaling.
        target_modules: Module names/suffixes, a regex string, or `"all-linear"` (Linear and Conv1D layers). Default:
            PEFT's own default for the model type (`c_attn` for GPT-2, `query_key_value` for GPT-NeoX/Falcon,
            `q`/`v` for T5, ...), or `["q_proj", "v_proj"]` where PEFT has none.
        rank_pattern: Per-module ranks, exactly as `peft.LoraConfig.rank_pattern` (a module-name suffix or regular
            expression → rank, e.g. `{"q_proj": 16}`); any variant. Stored in the factor set and its cache key.
        alpha_pattern: Per-module alphas, exactly as `peft.LoraConfig.alpha_pattern`.
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
        calibration_data: Data-driven variants (`lora-sb`, `eva`, `corda`, `lora_ga`): tokenized rows (a
            `datasets.Dataset`, a list of dicts with `input_ids` and optionally `attention_mask` / `labels`) or
            model-input batches (a `DataLoader`).
            With `inilora_hf.SFTTrainer(model_init=...)` it defaults to the trainer's prepared train dataset.
            The sha256 of the exact samples used is recorded in `options["calibration"]` (part of the cache key).
        calibration_samples: Use exactly this many samples, the first ones in order (default: up to 64).
        calibration_batch_size: Rows per gradient batch for row data (default: the trainer's per-device batch
            size, else 8). Each batch's loss is divided by its sample count, as in LoRA-SB's code.
        distributed: Under `torchrun` / `accelerate launch` (an initialised process group of more than one rank),
            every rank computes a share of the target modules (and of the calibration batches) and rank 0 writes the
            factor set once; every rank must then call the init. False: compute in this process alone (other
            ranks wait for it through the cache).
        **options: Variant options, e.g. `steps=20000, lr=5e-4, seed=0` (inilora), `sigma=0.5`
            (inilora-alpha), `kaiming="uniform"` (inilora-beta), `eta=1e-5` (lora-sb: the first optimizer
            step's learning rate; `inilora_hf.SFTTrainer` derives it from its arguments when not given).

    Returns:
        An `InitFunction`; call it (or let a Trainer call it) to get a `PeftModel` with `.factor_set` and
        `.init_report`.

    Raises:
        TargetModuleError: `target_modules` matches no module, or a module that is not a Linear or Conv1D (e.g. the
            3-D expert weights of a mixture of experts); or `lora_config_kwargs` sets `target_parameters`.
        BaseModelNotFoundError: `model` is written as a path (`./x`, `/x`, `~/x`, `a/b/c`) but is no directory;
            a Hub id that does not exist, or is not cached while offline, raises it on the first call.

    Example:
        >>> from inilora_hf import inilora_init, SFTTrainer
        >>> init = inilora_init("meta-llama/Llama-2-7b-hf", variant="inilora", rank=8)   # doctest: +SKIP
        >>> init = inilora_init("./base", variant="pissa", rank=4, rank_pattern={"q_proj": 8})  # doctest: +SKIP
        >>> trainer = SFTTrainer(model_init=init, args=SFTConfig("out"), train_dataset=ds)  # doctest: +SKIP
    """
    loading = ModelLoading.from_arguments(
        model_class=model_class,
        dtype=dtype,
        torch_dtype=torch_dtype,
        revision=revision,
        model_kwargs=model_kwargs,
        quantization_config=quantization_config,
    )
    targets = None if target_modules is None else normalize_targets(target_modules)
    requested = {
        field: value
        for field, value in {
            "variant": variant,
            "rank": rank,
            "lora_alpha": lora_alpha,
            "use_rslora": use_rslora,
            "target_modules": targets,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
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
        target_modules=FALLBACK_TARGETS if targets is None else targets,
        options=options,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
    )
    init = InitFunction(
        model,
        config,
        factors=factors,
        loading=loading,
        options=FactorOptions(
            strict=strict,
            requested=requested if factors is not None else {},
            device=device,
            max_group_bytes=max_group_bytes,
            use_cache=use_cache,
            cache_dir=cache_dir,
            refine_steps=refine_steps,
            adapter_dtype=adapter_dtype,
            default_targets=targets is None and factors is None,
            distributed=distributed,
        ),
        calibration=CalibrationSource(calibration_data, calibration_samples, calibration_batch_size),
        lora_kwargs={"lora_dropout": lora_dropout, **(lora_config_kwargs or {})},
    )
    if calibration_data is not None and (factors is not None or not get_variant(config.variant).needs_calibration):
        raise ValueError(
            "`calibration_data` has no effect with "
            f"{'`factors=`' if factors is not None else f'variant {config.variant!r}'}: "
            "only data-driven variants (e.g. 'lora-sb') computed here use it. Drop it."
        )
    target_parameters = (lora_config_kwargs or {}).get("target_parameters")
    if target_parameters:
        raise TargetModuleError(
            f"`lora_config_kwargs` sets target_parameters={target_parameters!r}: PEFT adapts "
            f"parameters such as the 3-D expert weights of a mixture of experts through them, {MOE_UNSUPPORTED}. Drop "
            "it and target Linear layers with `target_modules` (e.g. the attention projections, or 'all-linear', "
            "which leaves the experts out)."
        )
    derived = sorted(set(lora_config_kwargs or {}) & _FACTOR_SET_LORA_FIELDS)
    if derived:
        raise ValueError(
            f"`lora_config_kwargs` sets {derived}, which the factor set determines. Pass them to `inilora_init` "
            "instead (`rank=`, `lora_alpha=`, `use_rslora=`, `target_modules=`, `rank_pattern=`, `alpha_pattern=`)."
        )
    if factors is not None and options:
        raise ValueError(
            f"Variant options {sorted(options)} have no effect with `factors=`: the factor set fixes them. "
            "Drop them, or compute a new factor set (factors=None)."
        )
    return init
