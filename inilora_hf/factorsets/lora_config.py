"""The `LoraConfig` a factor set implies (rank, alpha, rsLoRA, the exact target modules, per-module ranks)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from peft import LoraConfig

from .format import FactorSetData
from .targets import CONV1D_LAYOUT


def module_patterns(values: Mapping[str, float], default: float) -> dict[str, Any]:
    """PEFT `rank_pattern` / `alpha_pattern` entries that give each module (full name) its value: one escaped
    full-name key per module whose value differs from `default`, longest first (PEFT takes the first key that
    matches a dotted suffix, so a name never falls to a shorter name's key).

    Example:
        >>> module_patterns({"m.layers.0.q_proj": 8, "m.layers.0.v_proj": 4}, 4) == {re.escape("m.layers.0.q_proj"): 8}
        True
    """
    differing = sorted((name for name, value in values.items() if value != default), key=lambda n: (-len(n), n))
    return {re.escape(name): values[name] for name in differing}


def lora_config_for(factor_set: FactorSetData, **lora_kwargs: Any) -> LoraConfig:
    """The `LoraConfig` matching a factor set (rank, alpha, rsLoRA, the exact target modules, and each module's
    rank and alpha as explicit full-name `rank_pattern` / `alpha_pattern` entries where they differ from the
    defaults).

    `fan_in_fan_out` is True when a target is a Conv1D (GPT-2's layers, recorded in the fingerprints' `layout`),
    as PEFT needs for weights stored `in × out`; PEFT keeps it off for the Linear targets of the same model.

    The factors are written afterwards, so PEFT's own init is left at its default (`init_lora_weights=True`),
    which is also what a saved adapter must declare: reloading never re-runs a weight-mutating init.
    """
    config = factor_set.config
    names = sorted(factor_set.factors)
    conv1d = any(factor_set.fingerprints.get(name, {}).get("layout") == CONV1D_LAYOUT for name in names)
    lora_kwargs = {"fan_in_fan_out": conv1d, **lora_kwargs}
    return LoraConfig(
        r=config.rank,
        # PEFT annotates `lora_alpha` as int but takes any positive number (InitConfig resolved None to `rank`).
        lora_alpha=config.lora_alpha,  # type: ignore[arg-type]
        use_rslora=config.use_rslora,
        target_modules=names,
        rank_pattern=module_patterns({n: factor_set.factors[n].lora_A.shape[0] for n in names}, config.rank),
        alpha_pattern=module_patterns({n: config.alpha_for(n) for n in names}, config.lora_alpha or config.rank),
        init_lora_weights=True,
        **lora_kwargs,
    )
