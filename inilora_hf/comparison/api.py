"""`compare`: every init variant × seed on the same data, trained alike, evaluated on the same examples, with the
differences to a baseline tested (`results.json`, `summary.md`, `loss.png`, `metric.png`)."""

from __future__ import annotations

import os
import platform
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import peft
import torch
import transformers
from datasets import Dataset
from transformers import AutoTokenizer
from transformers.utils.logging import tqdm

from inilora_hf._version import __version__
from inilora_hf.errors import CompareInputError
from inilora_hf.log import get_logger
from inilora_hf.variants import get_variant
from inilora_hf.variants.config import normalize_targets

from .data import load_rows, split_eval, tokenize
from .records import RunStore, write_atomic, write_json_atomic
from .report import paired_to_baseline, summarize_runs, summary_markdown, write_plots
from .runner import METRICS, RunSettings, run_one
from .statistics import bootstrap_test_name

logger = get_logger(__name__)
BOOTSTRAP_SEED = 0


def compare(
    model: str | os.PathLike,
    dataset: str | os.PathLike | Dataset,
    *,
    variants: Sequence[str],
    output_dir: str | os.PathLike,
    seeds: Sequence[int] = (0, 1, 2),
    task: str = "causal-lm",
    text_field: str = "text",
    label_field: str = "label",
    eval_dataset: str | os.PathLike | Dataset | None = None,
    eval_split: float = 0.2,
    baseline: str = "lora",
    rank: int = 8,
    lora_alpha: float | None = None,
    target_modules: Sequence[str] | str = ("q_proj", "v_proj"),
    learning_rate: float = 1e-3,
    max_steps: int = 100,
    batch_size: int = 16,
    eval_batch_size: int = 64,
    max_length: int = 128,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    resamples: int = 10000,
    cache_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Fine-tune `model` with each init variant and seed, identically but for the init, and compare them.

    Every variant × seed run trains with `transformers.Trainer(model_init=inilora_init(...))` for `max_steps`
    steps (linear decay from `learning_rate`) and is evaluated on every eval example. For one seed all variants see
    the same batches in the same order and start from the same new head (the seed fixes both); a variant that takes
    a `seed` option gets the run's seed, a deterministic one (pissa, milora, ...) is computed once and reused from
    the factor-set cache. Each finished run is recorded at once in `output_dir/runs/` (atomically), so a re-run
    with the same settings skips it; `variants` and `seeds` may grow between re-runs. Several processes may run the
    same `compare` on one `output_dir` at once: each run is claimed through a lock file and done once, a run another
    process holds is waited for at the end, and every process returns (and writes) the same results.

    Args:
        model: A Hub id or local directory of a transformers model (and its tokenizer).
        dataset: A .jsonl/.json/.csv/.parquet file, a Hub dataset id (its train split), or a `datasets.Dataset`.
        variants: Init variants to compare, e.g. `["lora", "inilora", "pissa"]`; must include `baseline`.
        output_dir: Where `runs/`, `results.json`, `summary.md` and the plots go.
        seeds: One run per variant and seed.
        task: `"causal-lm"` (metrics eval_loss, token_accuracy) or `"seq-cls"` (accuracy, eval_loss; a new
            classification head, trained in full next to the LoRA factors).
        text_field: The column with the text.
        label_field: The column with the class (`seq-cls`); any values, mapped to classes in sorted order.
        eval_dataset: The evaluation data (same kinds as `dataset`); default: an `eval_split` fraction of
            `dataset`, drawn with a fixed seed (the same held-out examples for every run).
        eval_split: The held-out fraction when no `eval_dataset` is given.
        baseline: The variant every other one is compared with (paired bootstrap over eval examples).
        rank: LoRA rank.
        lora_alpha: LoRA alpha (default: the rank).
        target_modules: The modules that get LoRA factors (BERT: `["query", "value"]`).
        learning_rate: Peak learning rate, decayed linearly to 0 over `max_steps`.
        max_steps: Optimizer steps per run.
        batch_size: Training batch size.
        eval_batch_size: Evaluation batch size (does not change the results).
        max_length: Texts are truncated to this many tokens.
        options: Variant options per variant, e.g. `{"inilora": {"steps": 2000}}`.
        resamples: Bootstrap resamples of the paired test.
        cache_dir: The factor-set cache (default: `$INILORA_HF_CACHE`, else `$HF_HOME/inilora`).
        overwrite: Delete the runs already in `output_dir` and start over (without it, a folder holding runs of
            other settings, or other files, is refused before any work).

    Returns:
        The content of `results.json`: `config`, `runs` (per run: `metrics`, `history`, `predictions_sha256`,
        `batches_sha256`, `head_sha256`, `seconds`, ...), `summary` (`{variant: {metric: {mean, std, n}}}`),
        `paired` (`{variant: {metric: {delta_mean, ci95, p_value, test, seeds, seeds_test}}}`: the bootstrap over
        examples, and in `seeds_test` the paired t-test over seeds) and `test`.

    Raises:
        CompareInputError: an unknown variant or option, a baseline not among `variants`, a missing file or column,
            or an `output_dir` holding runs of other settings.
        OutputExistsError: `output_dir` holds other files.

    Example:
        >>> from inilora_hf import compare
        >>> results = compare("./minilm", "reviews.jsonl", task="seq-cls", variants=["lora", "pissa"],  # doctest: +SKIP
        ...                   seeds=[0, 1, 2], target_modules=["query", "value"], output_dir="cmp")
        >>> results["paired"]["pissa"]["accuracy"]["ci95"]                                            # doctest: +SKIP
        [-0.012, 0.007]
    """
    variants, seeds, options = list(variants), [int(seed) for seed in seeds], dict(options or {})
    _check_choices(variants, seeds, baseline, options)
    store = RunStore(output_dir)
    store.check(overwrite=overwrite)
    config: dict[str, Any] = {
        "model": str(model),
        "dataset": dataset if not isinstance(dataset, Dataset) else f"Dataset({dataset.num_rows} rows)",
        "eval_dataset": None
        if eval_dataset is None
        else str(eval_dataset)
        if not isinstance(eval_dataset, Dataset)
        else f"Dataset({eval_dataset.num_rows} rows)",
        "eval_split": None if eval_dataset is not None else eval_split,
        "task": task,
        "text_field": text_field,
        "label_field": label_field if task == "seq-cls" else None,
        "variants": variants,
        "seeds": seeds,
        "baseline": baseline,
        "rank": rank,
        "lora_alpha": lora_alpha,
        "target_modules": list(normalize_targets(target_modules)),
        "learning_rate": learning_rate,
        "max_steps": max_steps,
        "batch_size": batch_size,
        "max_length": max_length,
        "options": {variant: dict(values) for variant, values in options.items()},
        "metrics": list(METRICS.get(task, ())),
    }
    config["dataset"] = str(config["dataset"])
    rows = load_rows(dataset)
    train, evaluation = (
        (rows, load_rows(eval_dataset)) if eval_dataset is not None else split_eval(rows, eval_split=eval_split)
    )
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = tokenize(
        train, evaluation, tokenizer, task=task, text_field=text_field, label_field=label_field, max_length=max_length
    )
    config.update(eval_examples=data.evaluation.num_rows, eval_sha256=data.eval_sha256, labels=data.labels)
    store.start(config, overwrite=overwrite)
    settings = RunSettings(
        model=str(model),
        task=task,
        rank=rank,
        lora_alpha=lora_alpha,
        target_modules=tuple(config["target_modules"]),
        learning_rate=learning_rate,
        max_steps=max_steps,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        cache_dir=None if cache_dir is None else str(cache_dir),
    )
    plan = [(seed, variant) for seed in seeds for variant in variants]
    todo = [(seed, variant) for seed, variant in plan if not store.finished(variant, seed)]
    if len(todo) < len(plan):
        logger.info("%s: %d of %d runs already finished, skipped.", output_dir, len(plan) - len(todo), len(plan))
    headline = config["metrics"][0]
    with tqdm(total=len(plan), initial=len(plan) - len(todo), desc="compare runs", unit="run") as progress:
        taken: list[tuple[int, str]] = []  # runs another process holds: waited for after all the others
        for wait, runs in ((False, todo), (True, taken)):
            for seed, variant in runs:
                held = store.claim(variant, seed, wait=wait)
                if held is None:
                    logger.info("%s seed %d is running in another process; waiting for it at the end.", variant, seed)
                    taken.append((seed, variant))
                    continue
                with held:
                    if not store.finished(variant, seed):  # another process may have finished it meanwhile
                        work_dir = store.work_dir(variant, seed)
                        try:
                            record = run_one(
                                settings,
                                data,
                                tokenizer,
                                variant=variant,
                                seed=seed,
                                options=options.get(variant, {}),
                                work_dir=work_dir,
                            )
                        finally:
                            shutil.rmtree(work_dir, ignore_errors=True)
                        store.save(record)
                        logger.info(
                            "finished %s seed %d: %s = %.4f, eval_loss = %.4f (%.0f s)",
                            variant,
                            seed,
                            headline,
                            record["metrics"][headline],
                            record["metrics"]["eval_loss"],
                            sum(record["seconds"].values()),
                        )
                progress.update()
    return _write_results(store, config, plan, resamples=resamples)


def _check_choices(variants: list[str], seeds: list[int], baseline: str, options: dict[str, Any]) -> None:
    if not variants or not seeds:
        raise CompareInputError("compare needs at least one variant and one seed.")
    for name in (*variants, *options):
        try:
            get_variant(name)
        except ValueError as error:
            raise CompareInputError(str(error)) from None
    for variant, values in options.items():
        unknown = sorted(set(values) - set(get_variant(variant).defaults))
        if unknown:
            raise CompareInputError(
                f"variant {variant!r} has no option {', '.join(unknown)}; it takes: "
                f"{', '.join(sorted(get_variant(variant).defaults)) or 'none'}."
            )
    if baseline not in variants:
        raise CompareInputError(
            f"the baseline {baseline!r} is not among the variants {variants}; add it or pass --baseline."
        )
    if len(set(variants)) < len(variants) or len(set(seeds)) < len(seeds):
        raise CompareInputError("variants and seeds must not repeat.")


def _write_results(
    store: RunStore, config: dict[str, Any], plan: list[tuple[int, str]], *, resamples: int
) -> dict[str, Any]:
    started = time.perf_counter()
    runs = [store.load(variant, seed) for seed, variant in plan]
    metrics = config["metrics"]
    results: dict[str, Any] = {
        "config": config,
        "environment": {
            "inilora_hf": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
        },
        "runs": [{key: value for key, value in run.items() if key != "per_example"} for run in runs],
        "summary": summarize_runs(runs, metrics=metrics),
        "paired": paired_to_baseline(
            runs, baseline=config["baseline"], metrics=metrics, resamples=resamples, seed=BOOTSTRAP_SEED
        ),
        "test": bootstrap_test_name(resamples, BOOTSTRAP_SEED),
    }
    write_json_atomic(store.root / "results.json", results)
    write_atomic(store.root / "summary.md", summary_markdown(results).encode())
    write_plots(results, store.root)
    logger.info("wrote %s (statistics in %.1f s)", store.root / "results.json", time.perf_counter() - started)
    return results
