"""PEFT's own data-driven inits as variants: `eva`, `corda` and `lora_ga`.

They need the whole model and calibration data (forward passes for EVA's incremental SVD of layer inputs and CorDA's
input covariances, forward and backward passes for LoRA-GA's gradient), so they cannot run on one weight at a
time like `peft_native`'s. `inilora_hf.training.calibration.peft_pass` runs PEFT's own procedure on a copy of the
model (`initialize_lora_eva_weights`, `preprocess_corda`, `preprocess_loraga` + `get_peft_model`) and hands the
harvested factors to these functions in `VariantInputs.harvested`; this module declares the variants, validates
their options (the fields of PEFT's `EvaConfig`, `CordaConfig`, `LoraGAConfig`, PEFT's defaults) and builds the
`LoraConfig` PEFT runs with (`peft_lora_config`).

* `eva`: A = the top right-singular vectors of each layer's inputs, B = 0; the base weight is unchanged. With
  `rho > 1` EVA redistributes the ranks across layers (and, with `adjust_scaling_factors`, the alphas): the factor
  set's config then carries them as `rank_pattern` / `alpha_pattern`.
* `corda`: SVD of `W0·C` (C: the inputs' covariance), A and B from its top (`ipm`) or bottom (`kpm`) r triplets;
  base becomes `W0 − s·B·A`.
* `lora_ga`: SVD of the averaged loss gradient of `W0`, A and B from its singular vectors (`direction`, `scale`);
  base becomes `W0 − s·B·A`. PEFT draws random numbers (`torch.svd_lowrank`): seeded with `seed`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from peft import LoraConfig
from peft.tuners.lora.config import CordaConfig, EvaConfig, LoraGAConfig

from .citations import CORDA, EVA, LORA_GA
from .config import InitConfig
from .data_driven import check_calibration
from .inputs import VariantInputs
from .random import check_seed
from .registry import ModuleFactors, register_variant, require

#: Options of each variant that PEFT reads from its sub-config, with PEFT 0.21.2's defaults. CorDA's
#: `cache_file` / `covariance_file` (inilora_hf's cache replaces them), `verbose` and `prune_temporary_fields` do not
#: change the factors and are not options.
EVA_DEFAULTS = {
    "rho": 2.0,
    "tau": 0.99,
    "use_label_mask": True,
    "label_mask_value": -100,
    "whiten": False,
    "adjust_scaling_factors": True,
}
CORDA_DEFAULTS = {"corda_method": "ipm", "use_float16_for_covariance": False}
LORA_GA_DEFAULTS = {"direction": "ArB2r", "scale": "stable", "stable_gamma": 16}
LORA_GA_DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
LORA_GA_SCALES = ("stable", "weight_svd", "gd_scale", "unit")


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_eva(options: dict) -> None:
    check_calibration(options)
    rho, tau = options["rho"], options["tau"]
    require(_is_number(rho) and rho >= 1, f"`rho` (EVA's rank redistribution) must be a number ≥ 1, got {rho!r}.")
    require(_is_number(tau) and 0 <= tau <= 1, f"`tau` (EVA's convergence threshold) must be in [0, 1], got {tau!r}.")
    for name in ("use_label_mask", "whiten", "adjust_scaling_factors"):
        require(_is_bool(options[name]), f"`{name}` must be true or false, got {options[name]!r}.")
    value = options["label_mask_value"]
    require(_is_int(value), f"`label_mask_value` must be an integer (the ignored label, e.g. -100), got {value!r}.")


def _check_corda(options: dict) -> None:
    check_calibration(options)
    method = options["corda_method"]
    require(method in ("ipm", "kpm"), f"`corda_method` must be 'ipm' or 'kpm', got {method!r}.")
    fp16 = options["use_float16_for_covariance"]
    require(_is_bool(fp16), f"`use_float16_for_covariance` must be true or false, got {fp16!r}.")


def _check_lora_ga(options: dict) -> None:
    check_calibration(options)
    check_seed(options)
    direction, scale, gamma = options["direction"], options["scale"], options["stable_gamma"]
    require(direction in LORA_GA_DIRECTIONS, f"`direction` must be one of {LORA_GA_DIRECTIONS}, got {direction!r}.")
    require(scale in LORA_GA_SCALES, f"`scale` must be one of {LORA_GA_SCALES}, got {scale!r}.")
    require(_is_int(gamma) and gamma > 0, f"`stable_gamma` must be a positive integer, got {gamma!r}.")


def peft_lora_config(config: InitConfig, target_names: Sequence[str]) -> LoraConfig:
    """The `LoraConfig` PEFT runs a data-driven `config` with: rank, alpha, patterns, the exact target module names
    and the variant's sub-config (`EvaConfig`, `CordaConfig`, `LoraGAConfig`) built from its options.

    Example:
        >>> cfg = InitConfig("eva", rank=4, target_modules=["q_proj"], options={"rho": 1.0})
        >>> peft_lora_config(cfg, ["model.layers.0.self_attn.q_proj"]).eva_config.rho
        1.0
    """
    options = config.options
    sub_configs = {
        "eva": lambda: {"eva_config": EvaConfig(**{k: options[k] for k in EVA_DEFAULTS})},
        "corda": lambda: {"corda_config": CordaConfig(**{k: options[k] for k in CORDA_DEFAULTS})},
        "lora_ga": lambda: {"lora_ga_config": LoraGAConfig(**{k: options[k] for k in LORA_GA_DEFAULTS})},
    }
    require(config.variant in sub_configs, f"Variant {config.variant!r} is not one of PEFT's data-driven inits.")
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,  # type: ignore[arg-type]  # PEFT annotates int but takes any positive number
        use_rslora=config.use_rslora,
        target_modules=list(target_names),
        rank_pattern=dict(config.rank_pattern),
        alpha_pattern=dict(config.alpha_pattern),
        init_lora_weights=config.variant,  # type: ignore[arg-type]
        **sub_configs[config.variant](),
    )


def harvested_factors(inputs: VariantInputs) -> dict[str, ModuleFactors]:
    """The factors PEFT's data pass computed (`inputs.harvested`) for every module of `inputs.weights`.

    Raises:
        ValueError: no harvested factors (the variant was run without its data pass), or some module lacks them.
    """
    harvested = inputs.harvested or {}
    missing = sorted(set(inputs.weights) - set(harvested))
    if missing:
        raise ValueError(
            f"Variant {inputs.config.variant!r} got no factors from PEFT's data pass for {missing[:3]}: it runs "
            "through inilora_init(..., calibration_data=...) (or inilora_hf.SFTTrainer), which runs that pass."
        )
    return {name: harvested[name] for name in sorted(inputs.weights)}


@register_variant(
    "eva",
    residual=False,
    defaults={**EVA_DEFAULTS, "calibration": None},
    check=_check_eva,
    description="EVA (PEFT's own): A = top right-singular vectors of each layer's inputs on the calibration data, "
    "B = 0, ranks redistributed across layers (rho); base weight unchanged.",
    citation=EVA,
    peft_data_pass=True,
)
def eva(inputs: VariantInputs) -> dict[str, ModuleFactors]:
    """PEFT's `initialize_lora_eva_weights` (deterministic), harvested."""
    return harvested_factors(inputs)


@register_variant(
    "corda",
    residual=True,
    defaults={**CORDA_DEFAULTS, "calibration": None},
    check=_check_corda,
    description="CorDA (PEFT's own): A, B from the SVD of W0·C (C: input covariance on the calibration data), top "
    "(ipm) or bottom (kpm) r; base becomes W0 − s·B·A.",
    citation=CORDA,
    peft_data_pass=True,
)
def corda(inputs: VariantInputs) -> dict[str, ModuleFactors]:
    """PEFT's `preprocess_corda` + `init_lora_weights="corda"` (deterministic), harvested."""
    return harvested_factors(inputs)


@register_variant(
    "lora_ga",
    residual=True,
    defaults={**LORA_GA_DEFAULTS, "seed": 0, "calibration": None},
    check=_check_lora_ga,
    description="LoRA-GA (PEFT's own): A, B from the SVD of the averaged loss gradient on the calibration data; base "
    "becomes W0 − s·B·A.",
    citation=LORA_GA,
    peft_data_pass=True,
    aliases=("lora-ga",),
)
def lora_ga(inputs: VariantInputs) -> dict[str, ModuleFactors]:
    """PEFT's `preprocess_loraga` + `init_lora_weights="lora_ga"` (randomized SVD, seeded), harvested."""
    return harvested_factors(inputs)
