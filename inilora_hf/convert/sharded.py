"""Exports of a sharded model: FSDP2 (`torch.distributed.fsdp.fully_shard`, as `accelerate` / the Trainer apply
it; every rank holds a shard, a `DTensor`, of each parameter) or DeepSpeed ZeRO-3 (every rank holds a partition of
each parameter). `to_merged` / `to_lora` first gather the full tensors (an all-gather: every rank must call the
export), rank 0 writes the output, and every rank returns its path (or raises rank 0's error)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from torch import nn
from torch.distributed.tensor import DTensor

from inilora_hf.factorsets.distributed import current_ranks, on_first_rank
from inilora_hf.training.sharding import gathered, is_zero3_partitioned

T = TypeVar("T")


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` has `DTensor` (FSDP2-sharded) or DeepSpeed ZeRO-3 partitioned parameters.

    Example:
        >>> is_sharded(nn.Linear(2, 2))
        False
    """
    return any(isinstance(p, DTensor) or is_zero3_partitioned(p) for p in model.parameters())


@contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """For the block, every `DTensor` or ZeRO-3 partitioned parameter of `model` is replaced by a plain parameter
    holding its full tensor (gathered from all ranks, in the same module order on each; a parameter shared by
    several modules stays shared); the shards are put back afterwards, so training continues unchanged."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []  # FSDP2 registers each shard as a DTensor Parameter
    full: dict[int, nn.Parameter] = {}
    try:
        with gathered(model.parameters()):  # ZeRO-3: every partitioned parameter holds its full data in the block
            for module in model.modules():
                for name, parameter in list(module._parameters.items()):
                    if not (
                        isinstance(parameter, DTensor) or (parameter is not None and is_zero3_partitioned(parameter))
                    ):
                        continue
                    if id(parameter) not in full:
                        data = parameter.full_tensor() if isinstance(parameter, DTensor) else parameter.data.clone()
                        full[id(parameter)] = nn.Parameter(data.detach(), requires_grad=parameter.requires_grad)
                    swapped.append((module, name, parameter))
                    module._parameters[name] = full[id(parameter)]
        yield
    finally:
        for module, name, shard in swapped:
            module._parameters[name] = shard


def export_sharded(model: nn.Module, export: Callable[[], T]) -> T:
    """Run `export()` (which reads `model`) on rank 0 with the full parameters gathered on every rank; return its
    result on every rank, or raise its error on every rank.

    Example:
        >>> export_sharded(fsdp_model, lambda: to_merged(fsdp_model, "out/merged"))   # doctest: +SKIP
    """
    with full_parameters(model):
        ranks = current_ranks()
        return export() if ranks is None else on_first_rank(ranks, export)
