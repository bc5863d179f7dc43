"""The statistics of `compare`: per-variant mean ± std over seeds, and two tests of the difference between a variant
and the baseline: a paired bootstrap over eval examples (numpy; the seeds held fixed, the eval set resampled) and a
paired t-test over seeds (scipy's Student t; the eval set held fixed, the seeds a sample).

A metric is a ratio of sums over eval examples, `Σ num / Σ den`: accuracy has `num` = 1 for a correct example and
`den` = 1; a causal LM's token accuracy has `num` = correct tokens and `den` = tokens of the example. One run gives
one `(num, den)` pair of arrays over the same eval examples in the same order.

Example:
    >>> import numpy as np
    >>> summarize([0.78, 0.80])["mean"]
    0.79
    >>> ones = np.ones(4)
    >>> candidate, baseline = (np.array([1, 1, 1, 0.0]), ones), (np.array([1, 0, 1, 0.0]), ones)
    >>> paired_bootstrap([candidate], [baseline], resamples=200)["delta_mean"]
    0.25
    >>> paired_seed_test([0.80, 0.79, 0.81], [0.78, 0.78, 0.79])["better"]
    3
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

PerExample = tuple[np.ndarray, np.ndarray]  # (num, den) over the eval examples of one run
_CHUNK = 1000  # resamples drawn per batch: bounds the memory of the count matrix to _CHUNK × examples


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """`{"mean", "std", "n"}` of one metric over runs; `std` is the sample standard deviation (ddof = 1), None for
    a single run.

    Example:
        >>> summarize([1.0, 2.0, 3.0])
        {'mean': 2.0, 'std': 1.0, 'n': 3}
    """
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("summarize needs at least one value.")
    std = float(array.std(ddof=1)) if array.size > 1 else None
    return {"mean": float(array.mean()), "std": std, "n": int(array.size)}


def ratio_metric(num: np.ndarray, den: np.ndarray) -> float:
    """`Σ num / Σ den`, the value of a metric from its per-example parts.

    Example:
        >>> ratio_metric(np.array([1.0, 0.0, 1.0]), np.ones(3))
        0.6666666666666666
    """
    return float(np.sum(num, dtype=np.float64) / np.sum(den, dtype=np.float64))


def bootstrap_test_name(resamples: int, seed: int) -> str:
    """The description of the test `paired_bootstrap` runs, as written into results.json and summary.md."""
    return (
        f"paired bootstrap over eval examples ({resamples} resamples, seed {seed}; each resample draws the examples "
        "with replacement and uses the same draw for every seed and both variants; Δ = mean over seeds of "
        "variant − baseline; 95 % percentile interval; two-sided p = (1 + #{|Δ* − Δ| ≥ |Δ|}) / (resamples + 1))"
    )


def paired_bootstrap(
    candidate: Sequence[PerExample],
    baseline: Sequence[PerExample],
    *,
    resamples: int = 10000,
    seed: int = 0,
) -> dict[str, object]:
    """Paired bootstrap of Δ = mean over seeds of (metric of `candidate` − metric of `baseline`).

    `candidate[i]` and `baseline[i]` are the `(num, den)` arrays of the runs with the i-th seed, over the same eval
    examples. Each resample draws the example counts `w ~ Multinomial(n, 1/n)` (numpy's `default_rng(seed)`, in
    batches of 1000 rows), and recomputes Δ with every sum weighted by `w`. Returns `delta_mean` (the observed Δ),
    `ci95` (2.5 and 97.5 percentiles of the resampled Δ), `p_value` (two-sided, from the resampled Δ centred at the
    observed one) and `test` (this description).

    Example:
        >>> ones = np.ones(3)
        >>> paired_bootstrap([(ones, ones)], [(ones, ones)], resamples=100)["p_value"]
        1.0
    """
    if len(candidate) != len(baseline) or not candidate:
        raise ValueError("paired_bootstrap needs one baseline run per candidate run (the same seeds), at least one.")
    columns = [np.asarray(part, dtype=np.float64) for run in (*candidate, *baseline) for part in run]
    n = columns[0].size
    if any(column.shape != (n,) for column in columns):
        raise ValueError("paired_bootstrap: every run must have one value per eval example, the same examples.")
    parts = np.stack(columns, axis=1)  # examples × (num, den) of candidate runs, then of baseline runs
    seeds = len(candidate)

    def delta(weighted_sums: np.ndarray) -> np.ndarray:
        ratios = weighted_sums[..., 0::2] / weighted_sums[..., 1::2]
        return (ratios[..., :seeds] - ratios[..., seeds:]).mean(axis=-1)

    observed = float(delta(parts.sum(axis=0)))
    rng = np.random.default_rng(seed)
    draws = []
    for start in range(0, resamples, _CHUNK):
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(_CHUNK, resamples - start))
        draws.append(delta(counts @ parts))
    resampled = np.concatenate(draws)
    low, high = np.percentile(resampled, [2.5, 97.5])
    extreme = int(np.count_nonzero(np.abs(resampled - observed) >= abs(observed)))
    return {
        "delta_mean": observed,
        "ci95": [float(low), float(high)],
        "p_value": (1 + extreme) / (resamples + 1),
        "test": bootstrap_test_name(resamples, seed),
    }


SEED_TEST = (
    "paired t-test over seeds (Δ_s = variant − baseline on seed s; t = mean Δ / (sd Δ / √n), n − 1 degrees of "
    "freedom, two-sided p; 95 % interval mean Δ ± t_0.975 · sd Δ / √n; the eval examples are held fixed)"
)


def paired_seed_test(candidate: Sequence[float], baseline: Sequence[float]) -> dict[str, object]:
    """Paired t-test of the per-seed differences `candidate[i] − baseline[i]` (the metric of the runs with the i-th
    seed). Returns `delta_mean`, `ci95`, `p_value`, `t`, `df`, `better` (seeds where the candidate is higher),
    `n` and `test`. With one seed there is no test (`ci95`, `p_value` and `t` are None); when every seed gives the
    same difference there is no spread to test against: `p_value` is 1.0 for a zero difference, None otherwise.

    Example:
        >>> result = paired_seed_test([0.80, 0.79, 0.81], [0.78, 0.78, 0.79])
        >>> round(result["t"], 3), round(result["p_value"], 3)
        (5.0, 0.038)
    """
    deltas = np.asarray(candidate, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    if deltas.ndim != 1 or deltas.size == 0 or len(candidate) != len(baseline):
        raise ValueError("paired_seed_test needs one baseline value per candidate value (the same seeds).")
    n, mean = int(deltas.size), float(deltas.mean())
    result: dict[str, object] = {
        "delta_mean": mean,
        "ci95": None,
        "p_value": None,
        "t": None,
        "df": n - 1,
        "better": int(np.count_nonzero(deltas > 0)),
        "n": n,
        "test": SEED_TEST,
    }
    if n < 2:
        return result
    error = float(deltas.std(ddof=1) / np.sqrt(n))
    if error == 0.0:  # every seed gave the same difference: no spread to test against
        return {**result, "ci95": [mean, mean], "p_value": 1.0 if mean == 0.0 else None}
    t = mean / error
    half = float(stats.t.ppf(0.975, n - 1)) * error
    return {**result, "ci95": [mean - half, mean + half], "p_value": float(2 * stats.t.sf(abs(t), n - 1)), "t": t}
