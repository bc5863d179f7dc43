"""The init study: ``inilora_hf.compare`` on all-MiniLM-L6-v2 + Rotten Tomatoes sentences, split by movie.

    python -m benchmarks.study.run --threads 1                 # the default study (≤ 60 min on 2 idle cores)
    python -m benchmarks.study.run --quick                     # about a minute: checks the pipeline, not the inits

Design (IniLoRA paper setting): r = 8, alpha = 8, LoRA on ``query`` / ``value``, a new classification head trained
in full, batch 32, linear decay. One hyper-parameter, the learning rate, is chosen from ``LEARNING_RATES`` on the
validation movies (for the baseline ``lora``, seed 0: highest validation accuracy; if the choice favours a variant,
it is the baseline); then every
variant × seed trains on the train movies with it and is tested once on the test movies. Sizing from the measured
0.47 s/step with 2 idle threads: (3 selection runs + 6 variants × 5 seeds) × 150 steps ≈ 4 950 steps ≈ 39 min,
plus 33 evaluations and the IniLoRA fits (≈ 25 s per seed).

Writes ``--output-dir`` (default ``benchmarks/study/results``): ``selection/lr-*/`` and ``test/`` (the outputs of
``compare``: results.json, summary.md, loss.png, metric.png, runs/) and ``study.md`` (the choice, the split, the
timings). Re-running resumes: finished runs are skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from benchmarks.harness import add_run_arguments, pin_threads, run_header
from benchmarks.study.data import model_dir, movie_splits, read_reviews, write_jsonl
from inilora_hf import compare
from inilora_hf.log import get_logger

VARIANTS = ("lora", "inilora", "inilora-alpha", "inilora-beta", "pissa", "milora")
SELECTION_VARIANTS = ("lora",)
LEARNING_RATES = (5e-4, 1e-3, 2e-3)
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
    parser.add_argument("--steps", type=int, default=150, help="training steps per run (default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=None, help="skip the selection and use this rate")
    add_run_arguments(parser, repeats=None)
    args = parser.parse_args()
    pin_threads(args.threads)
    args.output_dir = args.output_dir or Path("/tmp/study-quick" if args.quick else "benchmarks/study/results")
    get_logger("inilora_hf.comparison").setLevel(logging.INFO)
    started = time.perf_counter()
    model = str(model_dir())
    splits = movie_splits(read_reviews())
    variants, seeds, steps = args.variants.split(","), list(range(args.seeds)), args.steps
    data_dir = args.output_dir / "data"
    if args.quick:  # small slices of the same splits: checks the pipeline in about a minute
        splits = {name: rows[:: {"train": 20, "validation": 10, "test": 10}[name]] for name, rows in splits.items()}
        variants, seeds, steps = ["lora", "pissa"], [0], 10
    files = {name: write_jsonl(rows, data_dir / f"{name}.jsonl") for name, rows in splits.items()}
    header = run_header(None)

    selection: dict[str, dict[str, float]] = {}
    if args.learning_rate is None and not args.quick:
        for rate in LEARNING_RATES:
            results = compare(
                model,
                files["train"],
                eval_dataset=files["validation"],
                variants=list(SELECTION_VARIANTS),
                seeds=[0],
                learning_rate=rate,
                max_steps=steps,
                output_dir=args.output_dir / "selection" / f"lr-{rate:g}",
                **SHARED,
            )
            selection[f"{rate:g}"] = {v: s["accuracy"]["mean"] for v, s in results["summary"].items()}
        rate = max(LEARNING_RATES, key=lambda r: sum(selection[f"{r:g}"].values()))
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
    seconds = time.perf_counter() - started
    selection_runs = [
        json.loads(path.read_text()) for path in sorted((args.output_dir / "selection").glob("lr-*/runs/*.json"))
    ]
    run_minutes = sum(sum(run["seconds"].values()) for run in [*results["runs"], *selection_runs]) / 60
    counts = {name: f"{len(rows)} sentences, {len({r['movie'] for r in rows})} movies" for name, rows in splits.items()}
    train_seconds = [run["seconds"]["train"] / steps for run in results["runs"]]
    lines = [
        "# Init study: all-MiniLM-L6-v2 on Rotten Tomatoes sentences (split by movie)",
        "",
        f"Command: `python -m benchmarks.study.run {' '.join(sys.argv[1:])}`; {header}.",
        f"Splits: {json.dumps(counts)}.",
        f"Selection of the learning rate on validation (seed 0, accuracy): {json.dumps(selection) or 'skipped'}; "
        f"chosen: {rate:g}.",
        f"Time of the {len(results['runs']) + len(selection_runs)} runs (factors + training + evaluation, summed over "
        f"the runs, including those of earlier invocations that this one resumed): {run_minutes:.1f} min; this "
        f"invocation {seconds / 60:.1f} min. Training {min(train_seconds):.2f}–{max(train_seconds):.2f} s/step "
        f"(threads={args.threads}, machine shared with other jobs).",
        "",
        f"Claims to compare with: {PAPER}",
        "",
        (args.output_dir / "test" / "summary.md").read_text(),
    ]
    (args.output_dir / "study.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
