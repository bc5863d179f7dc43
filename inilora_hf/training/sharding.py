"""Refusing DeepSpeed ZeRO-3: it partitions every parameter across the ranks as the model loads (each rank holds
an empty placeholder with a `ds_id`), so the init could neither read W0 nor write the residual. DDP and FSDP
(`fully_shard` after the init, as accelerate and the Trainer apply it) are supported; ZeRO stages 1 and 2 leave
the parameters whole."""

from __future__ import annotations

from torch import nn
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from inilora_hf.errors import UnsupportedShardingError


def refuse_zero3(model: nn.Module | None = None) -> None:
    """Raise `UnsupportedShardingError` if DeepSpeed ZeRO-3 is active (transformers' own flag, set by the Trainer's
    or `HfDeepSpeedConfig`'s ZeRO-3 config; checked before a model is loaded, since loading would partition it) or
    `model`'s parameters are ZeRO-3 partitioned.

    Example:
        >>> refuse_zero3(nn.Linear(2, 2))  # a whole model outside ZeRO-3: nothing happens
    """
    partitioned = model is not None and any(hasattr(p, "ds_id") for p in model.parameters())
    if is_deepspeed_zero3_enabled() or partitioned:
        raise UnsupportedShardingError(
            "DeepSpeed ZeRO-3 partitions the base model's weights across the ranks, and inilora_hf cannot read W0 "
            "or write the residual through it. Train with DDP, FSDP (fsdp / fsdp_config) or ZeRO stage 1 or 2."
        )
