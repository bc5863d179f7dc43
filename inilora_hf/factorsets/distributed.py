"""One factor set computed by the ranks of a `torch.distributed` job (`torchrun`, `accelerate launch`, a Trainer
under DDP): the target modules are split across the ranks, each rank fits its share, rank 0 gathers the factors
and writes the factor set once, and every rank ends with it.

Why the result is bit-identical to one process: the variants in `PER_MODULE_VARIANTS` compute each module from
that module alone (its own generator `module_generator(seed, name)`, its own slice of a batched Adam fit or SVD),
and IniLoRA's pooled σ̄ per module type is computed from all targets and handed to every rank as `std_by_type`.
A rank thus computes exactly what one process computes for the same modules, given the same number of intra-op
threads (LAPACK's SVD may round differently with another thread count; the Adam fit does not). Other variants
(PEFT-native ones, `solver="rsvd"`, plug-ins) are computed whole by rank 0 while the others wait.

What is communicated, in order: each rank's config and base-weight digest (`agree`, a few hundred bytes), the
fitted factors of each share to rank 0 (`gather_object`, `r·(in + out)` fp32 values per module), and the finished
factor set from rank 0 to the others (`broadcast_object_list`). No weight matrix is ever sent.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from inilora_hf.errors import RankMismatchError
from inilora_hf.log import get_logger
from inilora_hf.variants import ModuleFactors, get_variant
from inilora_hf.variants.approximation import mean_by_type
from inilora_hf.variants.config import InitConfig

from .cache import get_or_build
from .compute import provenance, run_variant
from .factor_set import FactorSet
from .fingerprint import cache_key, model_key
from .report import fit_statistics

logger = get_logger(__name__)

T = TypeVar("T")

#: Variants whose factors for a module do not depend on which other modules are computed with it (checked for
#: each by `tests/test_distributed_compute.py`); `inilora` only with its `adam` and `svd` solvers. `lora-sb`'s
#: calibration gradients are summed across ranks first, then each module is computed alone.
PER_MODULE_VARIANTS = frozenset(
    {"lora", "gaussian", "inilora", "inilora-alpha", "inilora-beta", "pissa", "milora", "lora-sb"}
)
#: Seconds a collective may wait when this package starts the process group itself (the command line).
DEFAULT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class RankContext:
    """This process's place in a distributed job of more than one process.

    Example:
        >>> RankContext(rank=0, world_size=2).is_main
        True
    """

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        """Rank 0, which gathers the factors and writes the factor set."""
        return self.rank == 0


def current_ranks() -> RankContext | None:
    """The rank and world size of an initialised process group with more than one rank, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return RankContext(dist.get_rank(), dist.get_world_size())
    return None


@contextmanager
def launched_process_group(
    *, device: torch.device | str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> Iterator[RankContext | None]:
    """Join the process group of a `torchrun` launch (`WORLD_SIZE` > 1 in the environment) for the block: gloo
    on CPU, NCCL when `device` is CUDA. An existing process group is used as it is; one process yields None.

    Example:
        >>> with launched_process_group() as ranks:  # a plain `python` process
        ...     ranks is None
        True
    """
    if current_ranks() is not None or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield current_ranks()
        return
    cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    try:
        yield current_ranks()
    finally:
        dist.destroy_process_group()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 300 else text[:300] + "…"


def _difference(mine: Any, theirs: Any) -> tuple[str, str]:
    """How two values differ, briefly: for dicts only the differing keys (`rank=8` vs `rank=4`)."""
    if isinstance(mine, dict) and isinstance(theirs, dict):
        keys = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        return ", ".join(f"{k}={_short(mine.get(k))}" for k in keys), ", ".join(
            f"{k}={_short(theirs.get(k))}" for k in keys
        )
    return _short(mine), _short(theirs)


def agree(ranks: RankContext, **values: Any) -> None:
    """Exchange `values` (small, picklable) and raise `RankMismatchError` on every rank if any rank's differ.

    Called before any work, so that ranks started with different arguments or files fail at once instead of
    waiting for each other in a later collective.
    """
    gathered: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(gathered, values)
    for rank, other in enumerate(gathered):
        for name in values:
            if other[name] != gathered[0][name]:
                first, this = _difference(gathered[0][name], other[name])
                raise RankMismatchError(
                    f"The ranks disagree on the {name}: rank 0 has {first}, rank {rank} has {this}. Every rank must "
                    "compute the same factor set: start all of them with the same arguments, base model files and "
                    "calibration data."
                )


def on_first_rank(ranks: RankContext, produce: Callable[[], T]) -> T:
    """Run `produce` on rank 0 and return its result on every rank; an exception it raises is raised on every
    rank (so all of them fail with the same message)."""
    outcome: list[Any] = [None]
    if ranks.is_main:
        try:
            outcome = [(True, produce())]
        except Exception as error:
            outcome = [(False, error)]
    dist.broadcast_object_list(outcome, src=0)
    succeeded, value = outcome[0]
    if not succeeded:
        raise value
    return value


def split_modules(costs: Mapping[str, int], world_size: int) -> list[list[str]]:
    """Split modules across ranks by cost: largest first (then by name) to the least-loaded rank (the lowest one
    on ties). Deterministic, so every rank computes the same split; each rank's list is sorted.

    Example:
        >>> split_modules({"a": 4, "b": 3, "c": 2, "d": 1}, 2)
        [['a', 'd'], ['b', 'c']]
    """
    loads = [0] * world_size
    shares: list[list[str]] = [[] for _ in range(world_size)]
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        shares[rank].append(name)
        loads[rank] += costs[name]
    return [sorted(share) for share in shares]


def splits_per_module(config: InitConfig) -> bool:
    """Whether `config`'s factors can be computed module by module on different ranks with a bit-identical
    result (see `PER_MODULE_VARIANTS`)."""
    name = get_variant(config.variant).name
    return name in PER_MODULE_VARIANTS and config.options.get("solver") != "rsvd"


def plan_shares(shapes: Mapping[str, tuple[int, ...]], config: InitConfig, world_size: int) -> list[list[str]]:
    """Which modules each rank computes: balanced by size (out × in; every module runs the same number of fit
    steps) for per-module variants, else everything on rank 0."""
    if not splits_per_module(config):
        logger.info("%s is not split across ranks: rank 0 computes every module.", config.variant)
        return [sorted(shapes)] + [[] for _ in range(world_size - 1)]
    costs = {name: int(torch.Size(shape).numel()) for name, shape in shapes.items()}
    return split_modules(costs, world_size)


@dataclass
class ShareResult:
    """What one rank computed: its modules' factors and fit statistics, its seconds, or the error it hit."""

    rank: int
    factors: dict[str, ModuleFactors] = field(default_factory=dict)
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    error: Exception | None = None


def fit_share(
    ranks: RankContext,
    weights: Mapping[str, torch.Tensor],
    config: InitConfig,
    *,
    device: torch.device,
    std_by_type: Mapping[str, float],
    gradients: Mapping[str, torch.Tensor] | None = None,
    max_group_bytes: int | None = None,
) -> ShareResult:
    """Run the variant on this rank's `weights` (fp32) and compute their fit statistics; an error is returned in
    the result (rank 0 raises it after the gather) so that no rank is left waiting in a collective."""
    started = time.perf_counter()
    if not weights:
        return ShareResult(ranks.rank)
    try:
        factors = run_variant(
            weights,
            config,
            device=device,
            gradients=None if gradients is None else {n: gradients[n] for n in weights},
            max_group_bytes=max_group_bytes,
            std_by_type=std_by_type,
        )
        stats = fit_statistics(weights, factors, config, device=device)
    except Exception as error:
        return ShareResult(ranks.rank, error=error)
    return ShareResult(ranks.rank, factors, stats, time.perf_counter() - started)


def gather_shares(ranks: RankContext, share: ShareResult) -> list[ShareResult]:
    """Send every rank's result to rank 0 (the others get `[]`); rank 0 raises the first rank's error."""
    gathered: list[Any] | None = [None] * ranks.world_size if ranks.is_main else None
    dist.gather_object(share, gathered, dst=0)
    if gathered is None:
        return []
    for result in gathered:
        if result.error is not None:
            raise result.error
    return gathered


def distributed_info(shares: list[ShareResult]) -> dict[str, Any]:
    """The `info["distributed"]` of a factor set: world size, and per rank its modules and fit seconds."""
    return {
        "world_size": len(shares),
        "threads_per_rank": torch.get_num_threads(),
        "ranks": [
            {"rank": share.rank, "modules": sorted(share.factors), "seconds": round(share.seconds, 3)}
            for share in shares
        ],
    }


def assemble(
    shares: list[ShareResult],
    config: InitConfig,
    *,
    fingerprints: Mapping[str, dict],
    base_model: str | None,
    base_revision: str | None,
    device: torch.device,
) -> FactorSet:
    """The factor set of all gathered shares, as one process would build it, with `info["distributed"]`."""
    factors = {name: factors for share in shares for name, factors in share.factors.items()}
    stats = {name: values for share in shares for name, values in share.stats.items()}
    info = provenance(max(share.seconds for share in shares), device)
    info["distributed"] = distributed_info(shares)
    return FactorSet(
        config=config,
        factors={name: factors[name] for name in sorted(factors)},
        fingerprints=dict(fingerprints),
        base_model=base_model,
        base_revision=base_revision,
        stats={name: stats[name] for name in sorted(stats)},
        info=info,
    )


def pooled_stds(weights: Mapping[str, torch.Tensor], config: InitConfig) -> dict[str, float]:
    """Per module (in the given order): the std of `W0 / s` that IniLoRA pools into σ̄ per module type."""
    return {name: (weight.float() / config.scaling_for(name)).std().item() for name, weight in weights.items()}


def _announce(message: tuple[str, Any]) -> None:
    dist.broadcast_object_list([message], src=0)


def _receive() -> tuple[str, Any]:
    received: list[Any] = [None]
    dist.broadcast_object_list(received, src=0)
    return received[0]


def compute_across_ranks(
    ranks: RankContext,
    weights: Mapping[str, torch.Tensor],
    config: InitConfig,
    *,
    fingerprints: Mapping[str, dict],
    base_model: str | None,
    base_revision: str | None,
    device: torch.device,
    gradients: Callable[[], Mapping[str, torch.Tensor]] | None = None,
    max_group_bytes: int | None = None,
    use_cache: bool = True,
    cache_dir: Path | None = None,
) -> tuple[FactorSet, str]:
    """Compute the factor set of `weights` (all targets, fp32, in model order) with every rank of `ranks`, through
    the cache; every rank returns it and where it came from (`"computed"` or `"cache:<key>"`).

    Every rank must call this with the same arguments (checked first: `RankMismatchError`). Rank 0 looks up the
    cache (holding its lock, so other jobs wait); on a miss each rank fits its share, `gradients()` (a
    collective, e.g. calibration gradients summed across ranks) runs on every rank first, rank 0 gathers and
    writes the entry atomically. A rank that dies leaves no entry: rank 0's gather fails and nothing is published.

    Example:
        >>> factor_set, source = compute_across_ranks(current_ranks(), weights, config,          # doctest: +SKIP
        ...     fingerprints=fps, base_model="./base", base_revision=None, device=torch.device("cpu"))
    """
    key = cache_key(model_key(dict(fingerprints)), config)
    agree(ranks, config=config.to_dict(), base_weights=model_key(dict(fingerprints)))
    plan = plan_shares({name: tuple(weight.shape) for name, weight in weights.items()}, config, ranks.world_size)
    std_by_type = mean_by_type(pooled_stds(weights, config))

    def compute() -> FactorSet | None:
        shares = gather_shares(
            ranks,
            fit_share(
                ranks,
                {name: weights[name] for name in plan[ranks.rank]},
                config,
                device=device,
                std_by_type=std_by_type,
                gradients=None if gradients is None else gradients(),
                max_group_bytes=max_group_bytes,
            ),
        )
        if not ranks.is_main:
            return None
        factor_set = assemble(
            shares, config, fingerprints=fingerprints, base_model=base_model, base_revision=base_revision, device=device
        )
        logger.info("Computed %s on %d ranks: %s", config.variant, ranks.world_size, factor_set.info["distributed"])
        return factor_set

    def computed_on_main() -> FactorSet:
        assert computed is not None, "rank 0 assembles the factor set"
        return computed

    if not use_cache:
        computed = compute()
        return on_first_rank(ranks, computed_on_main), "computed"
    if not ranks.is_main:
        message = _receive()
        if message[0] == "compute":
            compute()
            message = _receive()
        kind, value = message
        if kind == "failed":
            raise value
        return value, f"cache:{key}" if kind == "hit" else "computed"

    built: list[FactorSet] = []

    def build(directory: Path) -> None:
        _announce(("compute", None))
        factor_set = compute()
        assert factor_set is not None, "rank 0 assembles the factor set"
        factor_set.save_pretrained(directory)
        built.append(factor_set)

    try:
        lookup = get_or_build(key, build, cache_dir=cache_dir)
    except Exception as error:
        with suppress(Exception):  # a dead rank makes this fail too; the original error is the one to report
            _announce(("failed", error))
        raise
    if not built:  # sent to the other ranks, whose file systems need not hold rank 0's cache
        factor_set = FactorSet.from_pretrained(lookup.path, verify_checksums=False)  # get_or_build verified it
        _announce(("hit", factor_set))
        return factor_set, f"cache:{key}"
    _announce(("done", built[0]))
    return built[0], "computed"
