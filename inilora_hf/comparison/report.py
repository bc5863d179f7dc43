"""What a comparison reports: the per-variant summary, the paired differences to the baseline, `summary.md`, and
`loss.png` / `metric.png` when matplotlib is installed (`pip install "inilora_hf[plots]"`).

Example:
    >>> summary = summarize_runs(runs, metrics=["accuracy", "eval_loss"])                 # doctest: +SKIP
    >>> summary["pissa"]["accuracy"]["n"]                                                 # doctest: +SKIP
    5
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from inilora_hf.log import get_logger

from .records import write_atomic
from .statistics import SEED_TEST, paired_bootstrap, paired_seed_test, summarize

Figure: Any  # matplotlib's Figure class, or None without the optional `plots` extra
try:
    from matplotlib.figure import Figure
except ImportError:
    Figure = None

logger = get_logger(__name__)
PLOTS_HINT = 'matplotlib is not installed: no loss.png / metric.png. Get them with `pip install "inilora_hf[plots]"`.'


def _by_variant(runs: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        grouped.setdefault(run["variant"], []).append(run)
    return {variant: sorted(group, key=lambda run: run["seed"]) for variant, group in grouped.items()}


def summarize_runs(runs: Sequence[dict[str, Any]], *, metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`{variant: {metric: {"mean", "std", "n"}}}` over the seeds of each variant."""
    return {
        variant: {metric: summarize([run["metrics"][metric] for run in group]) for metric in metrics}
        for variant, group in _by_variant(runs).items()
    }


def paired_to_baseline(
    runs: Sequence[dict[str, Any]], *, baseline: str, metrics: Sequence[str], resamples: int, seed: int
) -> dict[str, dict[str, Any]]:
    """`{variant: {metric: {**paired_bootstrap(...), "seeds", "seeds_test": paired_seed_test(...)}}}` of each
    variant against `baseline`, over the seeds both have."""
    grouped = _by_variant(runs)
    reference = {run["seed"]: run for run in grouped.get(baseline, [])}
    paired: dict[str, dict[str, Any]] = {}
    for variant, group in grouped.items():
        pairs = [(run, reference[run["seed"]]) for run in group if run["seed"] in reference]
        if variant == baseline or not pairs:
            continue
        paired[variant] = {
            metric: {
                **paired_bootstrap(
                    [_parts(run, metric) for run, _ in pairs],
                    [_parts(base, metric) for _, base in pairs],
                    resamples=resamples,
                    seed=seed,
                ),
                "seeds": [run["seed"] for run, _ in pairs],
                "seeds_test": paired_seed_test(
                    [run["metrics"][metric] for run, _ in pairs], [base["metrics"][metric] for _, base in pairs]
                ),
            }
            for metric in metrics
        }
    return paired


def _parts(run: dict[str, Any], metric: str) -> tuple[np.ndarray, np.ndarray]:
    values = run["per_example"][metric]
    return np.asarray(values["num"], dtype=np.float64), np.asarray(values["den"], dtype=np.float64)


def _number(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _p_value(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}" if value >= 0.001 else "< 0.001"


def _delta(mean: float, ci95: list[float] | None) -> str:
    return f"{mean:+.4f}" if ci95 is None else f"{mean:+.4f} [{ci95[0]:+.4f}, {ci95[1]:+.4f}]"


def summary_markdown(results: dict[str, Any]) -> str:
    """The tables a person reads, one per metric: per variant, mean ± std over seeds (n), and Δ to the baseline
    with its 95 % interval and p-value from each test (the bootstrap over examples, the t-test over seeds), and in
    how many seeds the variant was higher."""
    config, summary, paired = results["config"], results["summary"], results["paired"]
    baseline = config["baseline"]
    lines = [
        f"# Comparison on {config['model']}",
        "",
        f"{config['task']}, r = {config['rank']} on {', '.join(config['target_modules'])}, {config['max_steps']} "
        f"steps, batch {config['batch_size']}, learning rate {config['learning_rate']}, seeds "
        f"{', '.join(map(str, config['seeds']))}; {config['eval_examples']} eval examples. Baseline: {baseline}.",
        "",
    ]
    for metric in config["metrics"]:
        lines += [
            f"## {metric}",
            "",
            "| variant | mean ± std | n | Δ [95 % CI], examples | p | Δ [95 % CI], seeds | p | higher in |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for variant, values in summary.items():
            stats = values[metric]
            row = [variant, f"{_number(stats['mean'])} ± {_number(stats['std'])}", str(stats["n"])]
            pair = paired.get(variant, {}).get(metric)
            if pair is None:
                row += ["(baseline)" if variant == baseline else "–"] + ["–"] * 4
            else:
                seeds = pair["seeds_test"]
                row += [_delta(pair["delta_mean"], pair["ci95"]), _p_value(pair["p_value"])]
                row += [_delta(seeds["delta_mean"], seeds["ci95"]), _p_value(seeds["p_value"])]
                row.append(f"{seeds['better']}/{seeds['n']} seeds")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += [f"Tests: examples — {results['test']}; seeds — {SEED_TEST}.", ""]
    if Figure is None:
        lines += [PLOTS_HINT, ""]
    else:
        lines += [
            "Plots: `loss.png` (training loss, mean over seeds with a min–max band; see its title), `metric.png`.",
            "",
        ]
    return "\n".join(lines)


def _moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Means of `window` consecutive values (`len(values) - window + 1` of them); the values themselves for 1."""
    return np.convolve(np.asarray(values, dtype=float), np.ones(window) / window, mode="valid")


def write_plots(results: dict[str, Any], folder: Path) -> list[Path]:
    """`loss.png` and `metric.png` in `folder`; none (and a log line saying how to get them) without matplotlib."""
    if Figure is None:
        logger.warning(PLOTS_HINT)
        return []
    grouped = _by_variant(results["runs"])
    # Ten colours, then the same colours with another line style / marker: every variant stays distinguishable.
    styles = [
        (f"C{index % 10}", ("-", "--", ":")[index // 10 % 3], "os^"[index // 10 % 3]) for index in range(len(grouped))
    ]
    loss_figure = Figure(figsize=(8.5, 4.5))
    axes = loss_figure.subplots()
    window = max(1, len(next(iter(grouped.values()))[0]["history"]) // 20)  # per-batch losses are noisy
    for (variant, group), (color, line, _) in zip(grouped.items(), styles, strict=True):
        steps = np.array([entry["step"] for entry in group[0]["history"]])[window - 1 :]
        losses = np.array([_moving_average([entry["loss"] for entry in run["history"]], window) for run in group])
        axes.plot(steps, losses.mean(axis=0), color=color, linestyle=line, label=variant)
        axes.fill_between(steps, losses.min(axis=0), losses.max(axis=0), color=color, alpha=0.12)
    smoothing = f"; moving average over {window} steps" if window > 1 else ""
    axes.set(xlabel="step", ylabel="training loss", title=f"Training loss (mean over seeds, min–max band{smoothing})")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    metric = results["config"]["metrics"][0]
    metric_figure = Figure(figsize=(max(6.0, 0.5 * len(grouped) + 2), 4.5))
    axes = metric_figure.subplots()
    for position, (group, (color, _, marker)) in enumerate(zip(grouped.values(), styles, strict=True)):
        values = [run["metrics"][metric] for run in group]
        axes.scatter(np.full(len(values), position), values, color=color, marker=marker, alpha=0.6)
        axes.hlines(np.mean(values), position - 0.3, position + 0.3, color="black")
    axes.set_xticks(range(len(grouped)), list(grouped), rotation=45, ha="right")
    axes.set(ylabel=metric, title=f"Final {metric} per seed (line: mean)")
    paths = [folder / "loss.png", folder / "metric.png"]
    for figure, path in zip((loss_figure, metric_figure), paths, strict=True):
        figure.tight_layout()
        image = io.BytesIO()
        figure.savefig(image, format="png", dpi=120)
        write_atomic(path, image.getvalue())
    return paths
