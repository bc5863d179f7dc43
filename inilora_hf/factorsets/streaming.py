"""Streamed factor-set computation for checkpoints larger than memory.

`compute_streamed` never loads the model. It builds the module tree on the meta device to find the targets
(with the same matching and Linear checks as `inilora_init`), then reads only the target tensors from the
safetensors files, one tensor or one bounded group at a time:

1. Pass 1, per target tensor: its fingerprint (in its stored dtype, as `model_fingerprints` gives for the
   model loaded in that dtype) and the std of `W0 / s` (pooled per module type into the σ̄ of `inilora`).
2. Pass 2, per group of same-shape matrices sized to `max_memory`: the variant on that subset (with the
   whole-model σ̄), its fit statistics, and the group's factors saved to a work directory. A rerun after an
   interruption skips the groups found there.

The factor set is then assembled and written atomically. Since variants draw each module from its own
generator and pool statistics through `std_by_type`, the result equals the in-memory computation of
`inilora_init(base, ...).prepare()` on the model loaded in its stored dtype.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils.hub import convert_file_size_to_int
from transformers.utils.logging import tqdm

from inilora_hf.errors import FactorSetError, OutputExistsError
from inilora_hf.factorsets.factor_set import FactorSet
from inilora_hf.factorsets.format import METADATA_NAME
from inilora_hf.linalg.grouping import shape_groups
from inilora_hf.log import get_logger
from inilora_hf.output_dirs import staged_output_dir
from inilora_hf.variants import ModuleFactors, get_variant
from inilora_hf.variants.approximation import mean_by_type
from inilora_hf.variants.config import InitConfig

from .cache import exclusive_lock, resumable_dir
from .checkpoint_files import TensorLocation, checkpoint_files, locate_targets, read_tensor, resolve_checkpoint
from .compute import default_device, provenance, run_variant
from .fingerprint import cache_key, model_key, weight_fingerprint
from .report import fit_statistics
from .targets import check_rank, find_target_linears, layer_shape, layout_of

logger = get_logger(__name__)

#: A group's fp32 stack may use `max_memory / WORKING_SET_FACTOR` bytes: the rest is for the fp32 copies of the
#: group's weights, the variant's scaled targets and its working set. Measured on CPU: a PiSSA group peaks at
#: about 6× its stack (weights, W/s, stack, U, Vᴴ, LAPACK workspace), the IniLoRA fit at about 4×.
WORKING_SET_FACTOR = 8
GROUP_PREFIX = "group-"


def parse_memory(value: int | str | None) -> int | None:
    """Bytes from an int or a size string (`"512MB"`, `"2GB"`, `"1GiB"`); None stays None (no bound).

    Example:
        >>> parse_memory("512MB"), parse_memory("1GiB"), parse_memory(4096), parse_memory(None)
        (512000000, 1073741824, 4096, None)
    """
    if value is None:
        return None
    try:
        size = int(value) if isinstance(value, str) and value.strip().isdigit() else convert_file_size_to_int(value)
    except (ValueError, TypeError, AttributeError):
        size = None
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(
            f"`max_memory` must be a positive number of bytes or a size like '512MB', '2GB' or '1GiB', got {value!r}."
        )
    return size


def target_shapes(
    directory: Path, config: InitConfig, *, model_class: type | None = None
) -> tuple[dict[str, tuple[int, int]], str, dict[str, str | None]]:
    """Target module name → `(out, in)` and → `layout_of` its layer, found on a weightless (meta-device) copy of the
    model, and its `base_model_prefix`. Matching, Linear and rank checks are those of the in-memory path."""
    model_config = AutoConfig.from_pretrained(directory)
    if getattr(model_config, "quantization_config", None) is not None:
        raise ValueError(
            f"The checkpoint in {directory} is pre-quantized ({type(model_config.quantization_config).__name__}); "
            "streamed computation reads full-precision weights only. Use `inilora_init(..., quantization_config=...)`."
        )
    model_factory: Any = model_class or AutoModelForCausalLM  # an Auto or model class: both have `from_config`
    with torch.device("meta"):
        skeleton = model_factory.from_config(model_config)
    modules = find_target_linears(skeleton, config.target_modules, allow_meta=True)
    check_rank(modules, config)
    shapes = {name: layer_shape(module) for name, module in modules.items()}
    layouts = {name: layout_of(module) for name, module in modules.items()}
    return shapes, getattr(skeleton, "base_model_prefix", "") or "", layouts


def _read_group(
    names: list[str], locations: Mapping[str, TensorLocation], shapes: Mapping[str, tuple[int, int]]
) -> dict[str, torch.Tensor]:
    return {name: locations[name].out_in(read_tensor(locations[name], shapes[name]).float()) for name in names}


def _load_group(directory: Path, key: str, names: list[str]) -> FactorSet | None:
    """The saved result of one group, or None if absent, from another plan, or unreadable (then recomputed)."""
    if not (directory / METADATA_NAME).is_file():
        return None
    try:
        group = FactorSet.from_pretrained(directory)
    except (FactorSetError, OSError) as error:
        logger.warning("Recomputing group %s: its saved result is unreadable (%s).", directory.name, error)
        return None
    if group.info.get("work_key") != key or sorted(group.factors) != sorted(names):
        logger.warning("Recomputing group %s: it was saved by a run with other modules or settings.", directory.name)
        return None
    return group


def _save_group(group: FactorSet, directory: Path) -> None:
    """Write a group's result next to its final name, then rename it in (an interrupted write leaves no group)."""
    tmp = directory.with_name(f".tmp-{directory.name}-{uuid.uuid4().hex}")
    try:
        group.save_pretrained(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_output_dir(output_dir: Path, *, overwrite: bool) -> None:
    """Raise `OutputExistsError` for an `output_dir` that is a file, a non-empty folder without a factor set, or
    (unless `overwrite`) a folder holding a factor set. A new or empty folder is accepted."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputExistsError(f"{output_dir} exists and is not a directory; choose another output directory.")
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return
    if not (output_dir / METADATA_NAME).is_file():
        raise OutputExistsError(
            f"{output_dir} is not empty and holds no factor set ({METADATA_NAME}); choose a new or empty directory."
        )
    if not overwrite:
        raise OutputExistsError(
            f"{output_dir} already holds a factor set; pass overwrite=True (command line: --overwrite) to replace "
            "it, or choose another output directory."
        )


def _publish(factor_set: FactorSet, output_dir: Path, *, overwrite: bool) -> None:
    """Save to a temporary sibling directory and rename it to `output_dir` (replacing an older factor set only if
    `overwrite`)."""
    _check_output_dir(output_dir, overwrite=overwrite)
    with staged_output_dir(output_dir, overwrite=True) as staged:
        factor_set.save_pretrained(staged)


def _clear_work_dir(work: Path, count: int) -> None:
    """Remove the groups of a finished run (and the work dir if nothing else is in it)."""
    for index in range(count):
        shutil.rmtree(work / f"{GROUP_PREFIX}{index:05d}", ignore_errors=True)
    try:
        work.rmdir()
    except OSError:
        logger.debug("Kept work dir %s: it holds other files.", work)


def _plan(shapes: Mapping[str, tuple[int, int]], budget: int | None) -> list[list[str]]:
    """Groups of same-shape modules whose fp32 stack fits `budget` (one matrix at least), in a fixed order."""
    groups = list(shape_groups(shapes, max_bytes=budget))
    largest = max(out_features * in_features * 4 for out_features, in_features in shapes.values())
    if budget is not None and largest > budget:
        logger.warning(
            "The largest target matrix takes %.3g MB in fp32, more than the per-group budget of %.3g MB "
            "(max_memory / %d); such matrices are processed one at a time and peak memory exceeds max_memory. "
            "Raise max_memory to at least %.3g MB to stay within it.",
            largest / 1e6,
            budget / 1e6,
            WORKING_SET_FACTOR,
            largest * WORKING_SET_FACTOR / 1e6,
        )
    return groups


def compute_streamed(
    base: str | os.PathLike,
    config: InitConfig,
    output_dir: str | os.PathLike,
    *,
    max_memory: int | str | None = None,
    device: torch.device | str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    work_dir: str | os.PathLike | None = None,
    model_class: type | None = None,
    overwrite: bool = False,
) -> FactorSet:
    """Compute the factor set of `base` without loading the model, and write it to `output_dir`.

    Only the target weights are read from the safetensors files, in groups bounded by `max_memory`; finished
    groups are kept in a work directory, so rerunning the same call after an interruption resumes. The result
    equals `inilora_init(base, ...).prepare()` for the model loaded in its stored dtype (same factors,
    fingerprints and statistics), so `inilora_init(base, factors=output_dir)` accepts it.

    Args:
        base: A local checkpoint directory or a Hub model id (only `*.json` and `*.safetensors` are downloaded).
        config: What to compute (variant, rank, targets, options). Data-driven variants are refused.
        output_dir: Where the factor set is written, atomically. It must be new or empty, or hold a factor set
            and `overwrite=True`; this is checked before any work.
        max_memory: Memory for weights and working set, on top of the Python runtime (torch and transformers
            loaded, ~0.5 GB), e.g. `"2GB"`: a group's fp32 stack is at most `max_memory / WORKING_SET_FACTOR`
            (one matrix per group at least; a warning says when one matrix needs more). None: one group per
            shape, as in memory.
        device: Where the variant runs (default: CUDA if available, else CPU).
        revision: Hub revision of `base` (recorded as the resolved commit).
        token: Hub token for private repos.
        work_dir: Where finished groups are kept until the factor set is written (default: the cache's
            resumable directory of this base model and config). Its groups are removed after success; after
            a failure or interruption the finished groups stay for the next run, and a work dir this call
            created is removed if no group finished. A lock file `<work_dir>.lock` next to it keeps two runs
            from computing the same groups (removed when the run ends).
        model_class: Auto class used to build the module tree (default `AutoModelForCausalLM`).
        overwrite: Replace a factor set already in `output_dir` (otherwise refused before any work).

    Returns:
        The `FactorSet`, also saved in `output_dir`.

    Raises:
        ValueError: a data-driven variant, or checkpoint files that do not match the model's config.
        FileNotFoundError: no safetensors checkpoint, or a missing shard.
        TargetModuleError: a target matches no module, or matches a non-Linear module.
        OutputExistsError: `output_dir` holds a factor set (and not `overwrite`), other files, or is a file.

    Example:
        >>> from inilora_hf import InitConfig
        >>> from inilora_hf.factorsets.streaming import compute_streamed
        >>> fs = compute_streamed("meta-llama/Llama-2-70b-hf", InitConfig("pissa", rank=16),
        ...                       "factors/llama-70b-pissa-r16", max_memory="8GB")      # doctest: +SKIP
        >>> fs.config.variant, len(fs.factors)                                            # doctest: +SKIP
        ('pissa', 160)
    """
    spec = get_variant(config.variant)
    if spec.needs_calibration:
        raise ValueError(
            f"Variant {spec.name!r} needs calibration data; use inilora_init(..., calibration_data=...), which "
            "loads the model. Streamed computation supports weight-only variants."
        )
    if getattr(config, "quantization", None) is not None:
        raise ValueError(
            "This InitConfig is for a quantized base (`quantization` is set); its factors depend on the quantized "
            "layers. Use inilora_init(..., quantization_config=...), or drop `quantization` for a full-precision base."
        )
    _check_output_dir(Path(output_dir), overwrite=overwrite)
    budget_bytes = parse_memory(max_memory)
    stack_budget = None if budget_bytes is None else max(1, budget_bytes // WORKING_SET_FACTOR)
    device = torch.device(device) if device is not None else default_device()
    started = time.perf_counter()

    directory, base_revision = resolve_checkpoint(base, revision=revision, token=token)
    shapes, prefix, layouts = target_shapes(directory, config, model_class=model_class)
    locations = locate_targets(shapes, checkpoint_files(directory), prefix, layouts)

    fingerprints: dict[str, dict] = {}
    stds: dict[str, float] = {}
    with tqdm(total=len(shapes), desc="Fingerprinting target weights", unit="matrix") as progress:
        for name in shapes:  # model order, as the in-memory path pools σ̄
            weight = read_tensor(locations[name], shapes[name])
            fingerprints[name] = weight_fingerprint(weight, layout=locations[name].layout)
            stds[name] = (weight.float() / config.scaling_for(name)).std().item()
            del weight
            progress.update(1)
    std_by_type = mean_by_type(stds)

    key = cache_key(model_key(fingerprints), config)
    work = Path(work_dir) if work_dir is not None else resumable_dir(key, create=False)
    groups = _plan(shapes, stack_budget)
    logger.info(
        "Streaming %s for %d modules of %s in %d groups (max_memory=%s) on %s; work dir %s.",
        spec.name,
        len(shapes),
        base,
        len(groups),
        max_memory,
        device,
        work,
    )

    factors: dict[str, ModuleFactors] = {}
    stats: dict[str, dict[str, float]] = {}
    compute_seconds = 0.0
    resumed = 0
    # One process per work dir: a concurrent run of the same call waits instead of computing the same groups.
    with (
        exclusive_lock(work.with_name(f"{work.name}.lock")),
        tqdm(total=len(groups), desc="Factor groups", unit="group") as bar,
    ):
        created = not work.exists()
        work.mkdir(parents=True, exist_ok=True)
        try:
            for index, names in enumerate(groups):
                group_dir = work / f"{GROUP_PREFIX}{index:05d}"
                group = _load_group(group_dir, key, names)
                if group is None:
                    weights = _read_group(names, locations, shapes)
                    group_started = time.perf_counter()
                    group_factors = run_variant(weights, config, device=device, std_by_type=std_by_type)
                    seconds = time.perf_counter() - group_started
                    group = FactorSet(
                        config=config,
                        factors=group_factors,
                        fingerprints={name: fingerprints[name] for name in names},
                        stats=fit_statistics(weights, group_factors, config, device=device),
                        info={"work_key": key, "group": index, "compute_seconds": seconds},
                    )
                    del weights
                    _save_group(group, group_dir)
                else:
                    resumed += 1
                factors.update(group.factors)
                stats.update(group.stats)
                compute_seconds += group.info["compute_seconds"]
                bar.update(1)
            if resumed:
                logger.info("Resumed: %d of %d groups were already computed in %s.", resumed, len(groups), work)

            info = provenance(compute_seconds, device)
            info["streamed"] = {
                "max_memory": budget_bytes,
                "groups": len(groups),
                "resumed_groups": resumed,
                "wall_seconds": round(time.perf_counter() - started, 3),
            }
            factor_set = FactorSet(
                config=config,
                factors={name: factors[name] for name in sorted(factors)},
                fingerprints=fingerprints,
                base_model=str(base),
                base_revision=base_revision,
                stats=stats,
                info=info,
            )
            _publish(factor_set, Path(output_dir), overwrite=overwrite)
        except BaseException:  # interrupted or failed: keep finished groups to resume from, nothing else
            if created:
                with suppress(OSError):  # removed only if empty: no group finished
                    work.rmdir()
            raise
        _clear_work_dir(work, len(groups))
    logger.info("Wrote the %s factor set of %s (%d modules) to %s.", spec.name, base, len(factors), output_dir)
    return factor_set
