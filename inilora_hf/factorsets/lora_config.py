"""The `LoraConfig` a factor set implies (rank, alpha, rsLoRA, the exact target modules)."""

from __future__ import annotations

from typing import Any

from peft import LoraConfig

from .format import FactorSetData


def lora_config_for(factor_set: FactorSetData, **lora_kwargs: Any) -> LoraConfig:
    """The `LoraConfig` matching a factor set (rank, alpha, rsLoRA, the exact target modules).

    The factors are written afterwards, so PEFT's own init is left at its default (`init_lora_weights=True`),
    which is also what a saved adapter must declare: reloading never re-runs a weight-mutating init.
    """
    config = factor_set.config
    return LoraConfig(
        r=config.rank,
        # PEFT annotates `lora_alpha` as int but takes any positive number (InitConfig resolved None to `rank`).
        lora_alpha=config.lora_alpha,  # type: ignore[arg-type]
        use_rslora=config.use_rslora,
        target_modules=sorted(factor_set.factors),
        init_lora_weights=True,
        **lora_kwargs,
    )
