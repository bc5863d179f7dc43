"""DeepSpeed ZeRO-3: it partitions every parameter across the ranks as the model loads (each rank holds a slice in
`ds_tensor` and an empty placeholder with a `ds_id`). The init gathers the full target weights to read W0 (every
rank reads the same tensors, so every rank computes or receives the same factor set) and writes the residual
and the LoRA factors through `GatheredParameters(modifier_rank=0)`; the exports gather the full parameters
(`convert/sharded.py`). What still cannot run on a partitioned model is refused with `UnsupportedShardingError`:
bitsandbytes-quantized bases, data-driven variants (their calibration pass runs the model outside the DeepSpeed
engine) and a loaded, already partitioned model (`inilora_init` deep-copies a loaded model on every call)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from peft.utils.integrations import gather_params_ctx
from torch import nn
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from inilora_hf.errors import UnsupportedShardingError
from inilora_hf.linalg.bnb import bnb_bits


def is_zero3_partitioned(parameter: nn.Parameter) -> bool:
    """Whether `parameter` is a DeepSpeed ZeRO-3 partitioned parameter (it carries a `ds_id`).

    Example:
        >>> is_zero3_partitioned(nn.Linear(2, 2).weight)
        False
    """
    return hasattr(parameter, "ds_id")


@contextmanager
def gathered(parameters: Iterable[nn.Parameter]) -> Iterator[None]:
    """For the block, the ZeRO-3 partitioned ones among `parameters` hold their full data on every rank (every rank
    must enter it, with the same parameters in the same order); read-only: the partitions are kept, anything
    written is dropped on exit. Other parameters are left alone.

    Raises:
        UnsupportedShardingError: a parameter is partitioned but no DeepSpeed ZeRO-3 config is alive any more
            (transformers' flag, held by the Trainer's `TrainingArguments` or an `HfDeepSpeedConfig`).

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> with gathered(layer.parameters()):
        ...     tuple(layer.weight.shape)
        (2, 2)
    """
    partitioned = [p for p in parameters if is_zero3_partitioned(p)]
    if not partitioned:
        yield
        return
    if not is_deepspeed_zero3_enabled():
        raise UnsupportedShardingError(
            "The model's parameters are DeepSpeed ZeRO-3 partitioned, but no ZeRO-3 config is active any more, so "
            "they cannot be gathered. Export while the Trainer (its TrainingArguments) is alive, or after "
            "trainer.save_model() export the saved directory."
        )
    with gather_params_ctx(partitioned, modifier_rank=None):
        yield


def check_zero3_support(loaded: nn.Module | None = None, *, data_driven: bool = False, quantized: bool = False) -> None:
    """Raise `UnsupportedShardingError` for what the init cannot do under DeepSpeed ZeRO-3 (transformers' own flag,
    set by the Trainer's or `HfDeepSpeedConfig`'s ZeRO-3 config, or `loaded`'s parameters already partitioned):
    a data-driven variant still to compute (`data_driven`), a bitsandbytes-quantized base (`quantized`, or
    `loaded`'s own layers), or a loaded model given to `inilora_init` that is already partitioned. Nothing happens
    outside ZeRO-3.

    Example:
        >>> check_zero3_support(nn.Linear(2, 2), data_driven=True)  # a whole model outside ZeRO-3: nothing happens
    """
    partitioned = loaded is not None and any(is_zero3_partitioned(p) for p in loaded.parameters())
    if not (is_deepspeed_zero3_enabled() or partitioned):
        return
    fix = "Train with DDP, FSDP (fsdp / fsdp_config) or ZeRO stage 1 or 2"
    if quantized or (loaded is not None and any(bnb_bits(m) is not None for m in loaded.modules())):
        raise UnsupportedShardingError(
            f"DeepSpeed ZeRO-3 cannot partition a bitsandbytes-quantized base model for the init. {fix}, or use a "
            "full-precision base under ZeRO-3."
        )
    if data_driven:
        raise UnsupportedShardingError(
            "Data-driven variants run a calibration pass through the base model, which DeepSpeed ZeRO-3 "
            f"partitions outside its engine. {fix}, or compute the factor set first in a process without ZeRO-3 "
            "(`inilora_init(...).prepare().save_pretrained(directory)`) and pass it with factors=directory."
        )
    if partitioned:
        raise UnsupportedShardingError(
            "This loaded model is already DeepSpeed ZeRO-3 partitioned, and inilora_init copies the base on every "
            "call. Pass its Hub id or directory instead: each call loads it under ZeRO-3."
        )
