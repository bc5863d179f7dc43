"""Calibration gradients of a data-driven init computed by the ranks of a distributed job: the calibration
batches are split into one contiguous block per rank, each rank sums the gradients of its block, and the sums
are all-reduced, so every rank holds `G = Σ_b ∇_W (loss_b / n_b)` over all batches (equal to one process's sum up
to the order of the fp32 additions). Communicated: one fp32 `(out, in)` tensor per target module, once."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from inilora_hf.factorsets.distributed import RankContext

from .calibration import estimate_gradients


def rank_block(count: int, ranks: RankContext) -> range:
    """The indices of `count` items that `ranks.rank` takes: contiguous blocks, sizes differing by at most one.

    Example:
        >>> [list(rank_block(5, RankContext(rank, 2))) for rank in (0, 1)]
        [[0, 1, 2], [3, 4]]
    """
    size, extra = divmod(count, ranks.world_size)
    start = ranks.rank * size + min(ranks.rank, extra)
    return range(start, start + size + (1 if ranks.rank < extra else 0))


def estimate_gradients_across_ranks(
    ranks: RankContext,
    model: nn.Module,
    batches: Sequence[Mapping[str, Any]],
    target_names: Iterable[str],
    *,
    sample_counts: Sequence[int],
) -> dict[str, torch.Tensor]:
    """`estimate_gradients` over all `batches`, each rank running its `rank_block` of them; every rank returns the
    summed fp32 CPU gradients. Every rank must pass the same batches.

    Example:
        >>> grads = estimate_gradients_across_ranks(current_ranks(), model, cal.batches, names,   # doctest: +SKIP
        ...                                         sample_counts=cal.sample_counts)
    """
    block = rank_block(len(batches), ranks)
    sums = estimate_gradients(
        model, [batches[i] for i in block], target_names, sample_counts=[sample_counts[i] for i in block]
    )
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    for name in sorted(sums):  # the same order on every rank
        reduced = sums[name].to(device)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        sums[name] = reduced.cpu()
    return sums
