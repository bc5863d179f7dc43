"""`inilora-hf compute` under `torchrun --nproc_per_node N`: the streamed computation of `streaming`, split across
the ranks (see `distributed` for the split and why the result is bit-identical to one process).

Each rank reads only its own target tensors from the safetensors files, fingerprints and fits them; the
fingerprints and per-matrix stds are exchanged (`all_gather_object`, a few hundred bytes per module) so that every
rank knows the base-weight digest and IniLoRA's σ̄; rank 0 gathers the factors and writes `output_dir` once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from inilora_hf.log import get_logger
from inilora_hf.variants import get_variant
from inilora_hf.variants.approximation import mean_by_type
from inilora_hf.variants.config import InitConfig

from .checkpoint_files import checkpoint_files, resolve_checkpoint
from .compute import default_device
from .distributed import RankContext, agree, assemble, fit_share, gather_shares, on_first_rank, plan_shares, pooled_stds
from .factor_set import FactorSet
from .fingerprint import weight_fingerprint
from .streaming import (
    WORKING_SET_FACTOR,
    _check_output_dir,
    _publish,
    locate_targets,
    parse_memory,
    read_tensor,
    target_shapes,
)

logger = get_logger(__name__)


def compute_streamed_across_ranks(
    ranks: RankContext,
    base: str | os.PathLike,
    config: InitConfig,
    output_dir: str | os.PathLike,
    *,
    max_memory: int | str | None = None,
    device: torch.device | str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    model_class: type | None = None,
    overwrite: bool = False,
) -> FactorSet:
    """`compute_streamed` with the work split across `ranks`; every rank must call it with the same arguments
    (checked first: `RankMismatchError`). Returns the factor set on every rank; rank 0 writes it to `output_dir`
    (checked before any work). `max_memory` bounds each rank's groups. Nothing is kept for a resume: a failed
    or interrupted run leaves `output_dir` as it was and is simply run again.

    Example:
        >>> with launched_process_group() as ranks:                          # doctest: +SKIP
        ...     fs = compute_streamed_across_ranks(ranks, "./base", InitConfig("inilora"), "factors/out")
    """
    agree(
        ranks,
        config=config.to_dict(),
        base=str(base),
        revision=revision,
        output_dir=str(output_dir),
        max_memory=max_memory,
        overwrite=overwrite,
    )
    spec = get_variant(config.variant)
    if spec.needs_gradients or config.quantization is not None:
        raise ValueError(
            f"`inilora-hf compute` streams weight-only, full-precision variants; {spec.name!r} needs "
            "inilora_init (calibration data or a quantized base)."
        )
    on_first_rank(ranks, lambda: _check_output_dir(Path(output_dir), overwrite=overwrite))
    budget = parse_memory(max_memory)
    device = torch.device(device) if device is not None else default_device()
    started = time.perf_counter()

    directory, base_revision = resolve_checkpoint(base, revision=revision, token=token)
    shapes, prefix, layouts = target_shapes(directory, config, model_class=model_class)
    locations = locate_targets(shapes, checkpoint_files(directory), prefix, layouts)
    plan = plan_shares(shapes, config, ranks.world_size)
    stored = {name: read_tensor(locations[name], shapes[name]) for name in plan[ranks.rank]}
    exchanged: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(
        exchanged,
        (
            {n: weight_fingerprint(w, layout=locations[n].layout) for n, w in stored.items()},
            pooled_stds(stored, config),
        ),
    )
    fingerprints = {name: next(fps[name] for fps, _ in exchanged if name in fps) for name in shapes}
    stds = {name: next(values[name] for _, values in exchanged if name in values) for name in shapes}

    shares = gather_shares(
        ranks,
        fit_share(
            ranks,
            {name: locations[name].out_in(weight.float()) for name, weight in stored.items()},
            config,
            device=device,
            std_by_type=mean_by_type(stds),  # model order, as one process pools σ̄
            max_group_bytes=None if budget is None else max(1, budget // WORKING_SET_FACTOR),
        ),
    )
    del stored

    def publish() -> FactorSet:
        factor_set = assemble(
            shares, config, fingerprints=fingerprints, base_model=str(base), base_revision=base_revision, device=device
        )
        factor_set.info["distributed"]["wall_seconds"] = round(time.perf_counter() - started, 3)
        _publish(factor_set, Path(output_dir), overwrite=overwrite)
        logger.info("Wrote the %s factor set of %s (%d ranks) to %s.", spec.name, base, ranks.world_size, output_dir)
        return factor_set

    return on_first_rank(ranks, publish)
