"""The rules every benchmark follows, in one place.

* Threads are pinned (``--threads``, default 1) in the process and, through ``OMP_NUM_THREADS`` and friends,
  in every subprocess it starts; the count and the reason for the default are printed with the results.
* Compared methods run interleaved: repeat ``i`` runs every method once, starting from a different one each
  repeat, so a burst of load from other processes hits all methods alike instead of one method's block.
* Each measure is reported as the minimum (the least disturbed repeat) and the median over the repeats.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_run_arguments(parser, repeats=3)
    >>> args = parser.parse_args([])
    >>> pin_threads(args.threads)
    >>> runs = interleaved({"a": lambda: 1.0, "b": lambda: 2.0}, repeats=args.repeats)
    >>> runs["b"]
    [2.0, 2.0, 2.0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TypeVar

import torch

Key = TypeVar("Key", bound=Hashable)
Result = TypeVar("Result")

DEFAULT_THREADS = 1
THREADS_REASON = (
    "default 1: a second intra-op thread spin-waits for a core that another process may hold, so on a shared "
    "2-core machine every small op can stall for a scheduler tick and the timings follow the machine's load"
)
# The thread-pool variables read by OpenMP, MKL and OpenBLAS when a (sub)process starts.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def add_run_arguments(parser: argparse.ArgumentParser, *, repeats: int | None) -> None:
    """Add ``--threads`` (default 1) and, unless ``repeats`` is None, ``--repeats`` (default ``repeats``).

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_run_arguments(parser, repeats=5)
        >>> parser.parse_args(["--threads", "2"]).threads, parser.parse_args([]).repeats
        (2, 5)
    """
    parser.add_argument(
        "--threads", type=_positive, default=DEFAULT_THREADS, help=f"torch intra-op threads ({THREADS_REASON})"
    )
    if repeats is not None:
        parser.add_argument(
            "--repeats",
            type=_positive,
            default=repeats,
            help=f"interleaved repeats of every measure (default {repeats})",
        )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def pin_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads here and in every subprocess started from now on.

    Example:
        >>> pin_threads(1)
        >>> torch.get_num_threads(), os.environ["OMP_NUM_THREADS"]
        (1, '1')
    """
    for variable in THREAD_VARIABLES:
        os.environ[variable] = str(threads)
    torch.set_num_threads(threads)


def run_header(repeats: int | None) -> str:
    """One line stating what a run's numbers depend on: versions, the threads torch uses, repeats, machine load.

    Example:
        >>> run_header(5).startswith("torch ")
        True
    """
    repeated = "" if repeats is None else f"{repeats} interleaved repeats, min and median; "
    return (
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads={torch.get_num_threads()} pinned with --threads "
        f"({THREADS_REASON}); {repeated}loadavg(1 min) at start {os.getloadavg()[0]:.2f}"
    )


def interleaved(methods: Mapping[Key, Callable[[], Result]], repeats: int) -> dict[Key, list[Result]]:
    """Call every method once per repeat, each repeat starting one method further along; collect the results.

    Example:
        >>> calls = []
        >>> _ = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2)
        >>> calls
        ['a', 'b', 'b', 'a']
    """
    names = list(methods)
    results: dict[Key, list[Result]] = {name: [] for name in names}
    for repeat in range(repeats):
        start = repeat % len(names)
        for name in names[start:] + names[:start]:
            results[name].append(methods[name]())
    return results


def timed(fn: Callable[[], Result]) -> tuple[float, Result]:
    """Wall-clock seconds of ``fn()`` and its result.

    Example:
        >>> seconds, value = timed(lambda: 42)
        >>> value, seconds >= 0
        (42, True)
    """
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def min_median(values: Sequence[float]) -> tuple[float, float]:
    """``(min, median)`` of the repeats of one measure.

    Example:
        >>> min_median([3.0, 1.0, 2.0, 10.0])
        (1.0, 2.5)
    """
    return min(values), statistics.median(values)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, numeric: Sequence[bool]) -> str:
    """A markdown table; ``numeric[i]`` right-aligns column ``i``.

    Example:
        >>> print(markdown_table(["method", "s"], [["a", "1.0"]], numeric=[False, True]))
        | method | s |
        |---|---:|
        | a | 1.0 |
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def loadavg_line() -> str:
    """The machine's 1-minute load average now, for the end of a run.

    Example:
        >>> loadavg_line().startswith("loadavg(1 min) at end ")
        True
    """
    return f"loadavg(1 min) at end {os.getloadavg()[0]:.2f}"
