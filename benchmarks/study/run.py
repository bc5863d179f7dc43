"""The init study: ``inilora_hf.compare`` on all-MiniLM-L6-v2 + Rotten Tomatoes sentences, split by movie.

    python -m benchmarks.study.run --workers 2 --threads 1     # the default study: every built-in variant, 5 seeds
    python -m benchmarks.study.run --quick                     # about a minute: checks the pipeline, not the inits

Design (IniLoRA paper setting): r = 8, alpha = 8, LoRA on ``query`` / ``value``, a new classification head trained
in full, batch 32, 100 steps, linear decay. One hyper-parameter, the learning rate, is chosen from ``LEARNING_RATES``
on the validation movies: the rate with the highest mean validation accuracy of the baseline ``lora`` over
``SELECTION_SEEDS`` (a choice at the edge of the grid is flagged in ``study.md``). Then every variant × seed trains on
the train movies with it and is tested once on the test movies; the runs go seed by seed (every variant of seed 0,
then of seed 1, ...), so an interrupted study has the same seeds for every variant.

``--workers N`` starts N − 1 copies of this command that share the runs with it through ``compare``'s run locks
(each process pins ``--threads``). Measured on this project's 2-core CPU machine, 2 workers × 1 thread: 1.8–2.4 s
per training step and 218–339 s per run (factors + 100 steps + the test evaluation) in each worker, 32 runs in
72 min, so the 8 selection runs and the 75 test runs take about 3.1 h.

Writes ``--output-dir`` (default ``benchmarks/study/results``): ``selection/lr-*/`` and ``test/`` (the outputs of
``compare``: results.json, summary.md, loss.png, metric.png, runs/) and ``study.md`` (the choice, the split, the
timings). Re-running resumes: finished runs are skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import add_run_arguments, pin_threads, run_header
from benchmarks.study.data import model_dir, movie_splits, read_reviews, write_jsonl
from inilora_hf import compare
from inilora_hf.log import get_logger

VARIANTS = (
    "lora",
    "inilora",
    "inilora-alpha",
    "inilora-beta",
    "pissa",
    "pissa_niter",
    "milora",
    "olora",
    "lora-sb",
    "eva",
    "corda",
    "lora_ga",
    "gaussian",
    "orthogonal",
    "mica",
)
SELECTION_VARIANTS = ("lora",)
SELECTION_SEEDS = (0, 1)
LEARNING_RATES = (2e-3, 4e-3, 8e-3, 1.6e-2)
SHARED = {"task": "seq-cls", "rank": 8, "target_modules": ["query", "value"], "batch_size": 32, "max_length": 128}
PAPER = (
    "IniLoRA paper (seed `000_475e4337e9a11656.txt`): Table 1, RoBERTa-base GLUE average LoRA 85.2 → IniLoRA 85.8; "
    "Table 3, LLaMA2-7B GSM8K r = 8: LoRA 20.3, IniLoRA 22.4, IniLoRA-α 28.2, IniLoRA-β (K-N) 22.8, (K-U) 23.4."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a one-minute check: 2 variants, 1 seed, 10 steps")
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="default: benchmarks/study/results (--quick: /tmp/study-quick)"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=100, help="training steps per run (default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=None, help="skip the selection and use this rate")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the runs (default: %(default)s)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a copy started by --workers
    add_run_arguments(parser, repeats=None)
    args = parser.parse_args()
    pin_threads(args.threads)
    args.output_dir = args.output_dir or Path("/tmp/study-quick" if args.quick else "benchmarks/study/results")
    get_logger("inilora_hf.comparison").setLevel(logging.INFO)
    started = time.perf_counter()
    copies = [] if args.worker else [start_copy() for _ in range(args.workers - 1)]
    model = str(model_dir())
    splits = movie_splits(read_reviews())
    variants, seeds, steps = args.variants.split(","), list(range(args.seeds)), args.steps
    data_dir = args.output_dir / "data"
    if args.quick:  # small slices of the same splits: checks the pipeline in about a minute
        splits = {name: rows[:: {"train": 20, "validation": 10, "test": 10}[name]] for name, rows in splits.items()}
        variants, seeds, steps = ["lora", "pissa"], [0], 10
    files = {name: data_dir / f"{name}.jsonl" for name in splits}
    if not args.worker:
        for name, rows in splits.items():
            write_jsonl(rows, files[name])
    else:  # the first process writes the data; its copies wait for it
        while not all(path.is_file() for path in files.values()):
            time.sleep(1)
    header = run_header(None)

    selection: dict[str, float] = {}
    if args.learning_rate is None and not args.quick:
        for rate in LEARNING_RATES:
            results = compare(
                model,
                files["train"],
                eval_dataset=files["validation"],
                variants=list(SELECTION_VARIANTS),
                seeds=list(SELECTION_SEEDS),
                learning_rate=rate,
                max_steps=steps,
                output_dir=args.output_dir / "selection" / f"lr-{rate:g}",
                **SHARED,
            )
            selection[f"{rate:g}"] = results["summary"][SELECTION_VARIANTS[0]]["accuracy"]["mean"]
        rate = max(LEARNING_RATES, key=lambda r: selection[f"{r:g}"])
    else:
        rate = args.learning_rate or 1e-3
    results = compare(
        model,
        files["train"],
        eval_dataset=files["test"],
        variants=variants,
        seeds=seeds,
        learning_rate=rate,
        max_steps=steps,
        output_dir=args.output_dir / "test",
        **SHARED,
    )
    if args.worker:
        return
    failed = [copy.args for copy in copies if copy.wait() != 0]
    if failed:
        raise SystemExit(f"a worker failed: {failed}")
    write_report(args, results, selection, rate, splits, header, time.perf_counter() - started)


def start_copy() -> subprocess.Popen:
    """Start a copy of this command that shares the runs (``--worker``: it writes no data and no report)."""
    return subprocess.Popen([sys.executable, "-m", "benchmarks.study.run", *sys.argv[1:], "--worker"])


def write_report(
    args: argparse.Namespace,
    results: dict,
    selection: dict[str, float],
    rate: float,
    splits: dict[str, list[dict[str, str]]],
    header: str,
    seconds: float,
) -> None:
    """Write and print ``study.md``: the command, the splits, the selection, the timings, the claims, the table."""
    selection_runs = [
        json.loads(path.read_text()) for path in sorted((args.output_dir / "selection").glob("lr-*/runs/*.json"))
    ]
    run_minutes = sum(sum(run["seconds"].values()) for run in [*results["runs"], *selection_runs]) / 60
    counts = {name: f"{len(rows)} sentences, {len({r['movie'] for r in rows})} movies" for name, rows in splits.items()}
    steps = results["config"]["max_steps"]
    train_seconds = [run["seconds"]["train"] / steps for run in results["runs"]]
    at_edge = selection and rate in (min(LEARNING_RATES), max(LEARNING_RATES))
    edge = " (at the edge of the grid: a wider grid may choose another rate)" if at_edge else ""
    chosen = {key: round(value, 4) for key, value in selection.items()}
    lines = [
        "# Init study: all-MiniLM-L6-v2 on Rotten Tomatoes sentences (split by movie)",
        "",
        f"Command: `python -m benchmarks.study.run {' '.join(sys.argv[1:])}`; {header}.",
        f"Splits: {json.dumps(counts)}.",
        f"Selection of the learning rate on validation (lora, mean accuracy over seeds "
        f"{', '.join(map(str, SELECTION_SEEDS))}): {json.dumps(chosen) if chosen else 'skipped'}; "
        f"chosen: {rate:g}{edge}.",
        f"Time of the {len(results['runs']) + len(selection_runs)} runs (factors + training + evaluation, summed over "
        f"the runs, including those of earlier invocations that this one resumed): {run_minutes:.1f} min; this "
        f"invocation {seconds / 60:.1f} min with {args.workers} worker(s). Training "
        f"{min(train_seconds):.2f}–{max(train_seconds):.2f} s/step (threads={args.threads} per worker).",
        "",
        f"Claims to compare with: {PAPER}",
        "",
        (args.output_dir / "test" / "summary.md").read_text(),
    ]
    (args.output_dir / "study.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
