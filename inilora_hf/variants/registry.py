"""The variant registry: names → functions that turn target weights into LoRA factors.

A variant never touches PEFT, files or the model: it receives fp32 weight matrices (and, for data-driven
variants, calibration statistics) and returns the initial `lora_A` / `lora_B` of every target module.
Whether the base weight is replaced by the residual `R = W0 − s·B·A` is a property of the variant
(`residual=True`), applied uniformly by `inilora_hf.adapters.apply`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from inilora_hf.errors import VariantOptionError


@dataclass
class ModuleFactors:
    """Initial LoRA factors of one Linear module, in PEFT's layout.

    Attributes:
        lora_A: `(r, in_features)`.
        lora_B: `(out_features, r)`.
        extra: Variant-specific tensors saved alongside (e.g. a LoRA-XS core), keyed by a short name.
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


# A variant's compute function: `fn(inputs: VariantInputs) -> {module_name: ModuleFactors}`. `VariantInputs`
# (`inilora_hf.variants.inputs`) holds an `InitConfig`, whose validation looks variants up here, so this module
# types the argument loosely rather than import upwards.
VariantFn = Callable[..., dict[str, ModuleFactors]]
_Variant = TypeVar("_Variant", bound=VariantFn)


@dataclass(frozen=True)
class VariantSpec:
    """A registered variant: its function and how the rest of the pipeline must treat it."""

    name: str
    compute: VariantFn
    residual: bool
    defaults: Mapping[str, Any]
    check: Callable[[dict[str, Any]], None] | None = None
    description: str = ""
    citation: str | None = None
    needs_gradients: bool = False
    approximates_weight: bool = False
    frozen_factors: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    peft_data_pass: bool = False

    @property
    def needs_calibration(self) -> bool:
        """The variant is data-driven: it needs calibration data (`needs_gradients` or `peft_data_pass`)."""
        return self.needs_gradients or self.peft_data_pass

    def resolve_options(self, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """Fill in defaults and validate `options`, raising a `VariantOptionError` that lists the accepted names."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            accepted = ", ".join(sorted(self.defaults)) or "none"
            raise VariantOptionError(
                f"Unknown option(s) {unknown} for variant {self.name!r}. Accepted options: {accepted}."
            )
        resolved = {**self.defaults, **options}
        if self.check is not None:
            self.check(resolved)
        return resolved


_REGISTRY: dict[str, VariantSpec] = {}
_ALIASES: dict[str, str] = {}  # another spelling → the registered name
_FACTOR_NAMES = ("lora_A", "lora_B")


def register_variant(
    name: str,
    *,
    residual: bool = True,
    defaults: Mapping[str, Any] | None = None,
    check: Callable[[dict[str, Any]], None] | None = None,
    description: str = "",
    citation: str | None = None,
    needs_gradients: bool = False,
    approximates_weight: bool = False,
    frozen_factors: Sequence[str] = (),
    aliases: Sequence[str] = (),
    peft_data_pass: bool = False,
    overwrite: bool = False,
) -> Callable[[_Variant], _Variant]:
    """Register an init variant under `name` (decorator).

    The decorated function takes a `VariantInputs` and returns `{module_name: ModuleFactors}` for every
    module in `inputs.weights`. Caching, Hub push/pull and conversion work for it without further code.

    Args:
        name: The name users pass as `variant=`.
        residual: If True, the base weight becomes `W0 − s·B·A` so that the model is unchanged at init.
        defaults: Every option the variant accepts, with its default (`seed` is customary for random inits).
        check: Optional validator of the resolved options; raise `ValueError` with the fix in the message.
        description: One line for `inilora-hf inspect` and model cards.
        citation: BibTeX or a reference line for model cards.
        needs_gradients: The variant reads `inputs.gradients` (calibration data is required).
        approximates_weight: The factors approximate `W0`; the init report then includes the rank-r SVD optimum.
        frozen_factors: Factors that keep their initial value during training (`"lora_A"`, `"lora_B"`), e.g.
            MiCA's `("lora_B",)`; they are frozen the way PEFT freezes them, also after a resume.
        aliases: Other spellings accepted as `variant=` (e.g. a hyphenated one); factor sets record `name`.
        peft_data_pass: The factors come from PEFT's own data-driven init (`eva`, `corda`, `lora_ga`), run on the
            model and calibration data by `inilora_hf.training.calibration.peft_pass`; the variant receives them
            in `inputs.harvested`.
        overwrite: Allow replacing an existing registration.

    Example:
        >>> import torch
        >>> from inilora_hf import register_variant, ModuleFactors
        >>> @register_variant("tiny-constant", residual=True, defaults={"value": 0.01})
        ... def tiny_constant(inputs):
        ...     r = inputs.config.rank
        ...     v = inputs.config.options["value"]
        ...     return {n: ModuleFactors(torch.full((r, w.shape[1]), v), torch.full((w.shape[0], r), v))
        ...             for n, w in inputs.weights.items()}
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"A variant name must be a non-empty string, got {name!r}.")
    unknown_factors = sorted(set(frozen_factors) - set(_FACTOR_NAMES))
    if unknown_factors:
        raise ValueError(f"`frozen_factors` may name {_FACTOR_NAMES}, got {unknown_factors}.")
    spellings = (name, *aliases)
    if (
        isinstance(aliases, str)
        or not all(isinstance(spelling, str) and spelling for spelling in aliases)
        or len(set(spellings)) < len(spellings)
    ):
        raise ValueError(f"Aliases must be distinct non-empty strings other than {name!r}, got {list(aliases)!r}.")

    def decorator(fn: _Variant) -> _Variant:
        if name in _REGISTRY and not overwrite and _REGISTRY[name].compute is not fn:
            raise ValueError(f"A variant named {name!r} is already registered; pass overwrite=True to replace it.")
        taken = [s for s in spellings if _ALIASES.get(s, name) != name or (s != name and s in _REGISTRY)]
        if taken:
            raise ValueError(f"{taken} already name(s) another variant; choose other aliases for {name!r}.")
        _REGISTRY[name] = VariantSpec(
            name=name,
            compute=fn,
            residual=residual,
            defaults=dict(defaults or {}),
            check=check,
            description=description,
            citation=citation,
            needs_gradients=needs_gradients,
            approximates_weight=approximates_weight,
            frozen_factors=tuple(frozen_factors),
            aliases=tuple(aliases),
            peft_data_pass=peft_data_pass,
        )
        for stale in [alias for alias, target in _ALIASES.items() if target == name]:
            del _ALIASES[stale]  # a re-registration (overwrite=True) replaces the aliases too
        _ALIASES.update(dict.fromkeys(aliases, name))
        return fn

    return decorator


def get_variant(name: str) -> VariantSpec:
    """Look up a registered variant by its name or an alias, raising a `ValueError` that lists the known names.

    Example:
        >>> get_variant("pissa-niter").name
        'pissa_niter'
    """
    try:
        return _REGISTRY[_ALIASES.get(name, name)]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown init variant {name!r}. Known variants: {', '.join(available_variants())}. "
            "Register your own with `@inilora_hf.register_variant(name)`."
        ) from None


def available_variants() -> list[str]:
    """Names of all registered variants, sorted (aliases are not listed)."""
    return sorted(_REGISTRY)


def require(condition: bool, message: str) -> None:
    """Raise `VariantOptionError(message)` (a `ValueError`) unless `condition`; keeps option validators one line per
    rule."""
    if not condition:
        raise VariantOptionError(message)
