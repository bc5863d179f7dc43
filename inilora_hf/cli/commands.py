"""What each `inilora-hf` subcommand does, given its parsed arguments (`inilora_hf.cli` parses and dispatches).

This module imports the heavy layers (torch, transformers, peft); the CLI imports it only once a command runs.
Each `cmd_<name>(args)` prints its result and returns the exit status; errors propagate to `inilora_hf.cli.main`,
which prints them as one line.

Example:
    >>> from inilora_hf.cli import build_parser
    >>> cmd_inspect(build_parser().parse_args(["inspect", "factors/tiny-pissa"]))        # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
from pathlib import Path

from inilora_hf.comparison import compare
from inilora_hf.convert.export import load_checkpoint, to_lora, to_merged

# `streaming.compute_streamed` is looked up at call time (tests substitute it).
from inilora_hf.factorsets import streaming
from inilora_hf.factorsets.checkpoint_files import checkpoint_default_targets, resolve_checkpoint
from inilora_hf.factorsets.distributed import launched_process_group
from inilora_hf.factorsets.factor_set import FactorSet
from inilora_hf.factorsets.fingerprint import out_in_shape
from inilora_hf.factorsets.publish import download_factor_set
from inilora_hf.factorsets.report import NO_STATISTIC, fit_table
from inilora_hf.factorsets.streaming_ranks import compute_streamed_across_ranks
from inilora_hf.variants.config import InitConfig

from .demo import run_demo


def cmd_demo(args: argparse.Namespace) -> int:
    """`inilora-hf demo`: run `run_demo` and print its report, timings and output paths."""
    result = run_demo(
        args.output_dir,
        model=args.model,
        variant=args.variant,
        rank=args.rank,
        fit_steps=args.steps,
        train_steps=args.train_steps,
        cache_dir=args.cache_dir,
        overwrite=args.overwrite,
    )
    print(result.init_report.summary())
    print(f"\nfactor set: {result.factor_source} ({result.seconds['factor set']:.1f} s)")
    print(
        f"training: {len(result.losses)} steps in {result.seconds['training']:.1f} s, "
        f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}"
    )
    print(f"merged checkpoint reproduces the trained model: max |Δlogits| = {result.merged_max_logit_diff:.2e}")
    for name, path in result.paths.items():
        print(f"{name + ':':<28} {path}")
    return 0


def cmd_compute(args: argparse.Namespace) -> int:
    """`inilora-hf compute`: stream the factor set of `args.base` into `args.out`; under `torchrun` every rank
    computes a share and rank 0 writes it."""
    if args.targets is None:  # PEFT's default for the model type (the checkpoint is fetched once; compute reuses it)
        targets: tuple[str, ...] | str = checkpoint_default_targets(
            resolve_checkpoint(args.base, revision=args.revision)[0]
        )
    else:
        targets = args.targets if args.targets == "all-linear" else tuple(args.targets.split(","))
    config = InitConfig(
        variant=args.variant,
        rank=args.rank,
        lora_alpha=args.lora_alpha,
        use_rslora=args.rslora,
        target_modules=targets,
        options=dict(args.option),
        rank_pattern=dict(args.rank_pattern),
        alpha_pattern=dict(args.alpha_pattern),
    )
    common = {"max_memory": args.max_memory, "device": args.device, "revision": args.revision}
    with launched_process_group(device=args.device) as ranks:  # under torchrun: split across the ranks
        if ranks is None:
            factor_set = streaming.compute_streamed(
                args.base, config, args.out, work_dir=args.work_dir, overwrite=args.overwrite, **common
            )
            print(f"wrote {len(factor_set.factors)} modules to {args.out}")
            return 0
        if args.work_dir is not None:
            raise ValueError("--work-dir is for resuming one process; drop it when running under torchrun.")
        factor_set = compute_streamed_across_ranks(
            ranks, args.base, config, args.out, overwrite=args.overwrite, **common
        )
        if ranks.is_main:
            print(f"wrote {len(factor_set.factors)} modules to {args.out} ({ranks.world_size} ranks)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """`inilora-hf inspect`: print a factor set's config, provenance and per-module fit table."""
    factor_set = FactorSet.from_pretrained(args.path)
    config = factor_set.config
    print(
        f"variant: {config.variant}   rank: {config.rank}   lora_alpha: {config.lora_alpha:g}   "
        f"rslora: {config.use_rslora}   scaling: {config.scaling:g}{config.pattern_summary()}"
    )
    print(f"targets: {config.target_modules}   options: {config.options}")
    print(
        f"base model: {factor_set.base_model} (revision {factor_set.base_revision})   "
        f"residual stored: {factor_set.has_residual}"
    )
    for key, value in sorted(factor_set.info.items()):
        if key != "versions":
            print(f"{key}: {value}")
    shapes = {name: out_in_shape(factor_set.fingerprints[name]) for name in factor_set.factors}
    print("\n" + fit_table(factor_set.stats, shapes))
    if not factor_set.stats:
        print(f"{NO_STATISTIC}: {config.variant} does not fit s·B·A to W0, so there is no fit error to show.")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """`inilora-hf push`: upload a factor-set folder to a Hub repo."""
    factor_set = FactorSet.from_pretrained(args.path)
    info = factor_set.push_to_hub(
        args.repo_id, private=args.private or None, revision=args.revision, include_residual=args.include_residual
    )
    print(f"pushed {len(factor_set.factors)} modules to {info.repo_url.repo_id} (commit {info.oid})")
    print(info.commit_url)
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    """`inilora-hf pull`: download a factor set, verify its checksums and print its local path."""
    path = download_factor_set(args.repo_id, revision=args.revision)
    FactorSet.from_pretrained(path)  # verifies every file against its recorded checksum
    print(path)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """`inilora-hf convert`: write the merged checkpoint and/or standard LoRA adapter of a checkpoint."""
    model, tokenizer = load_checkpoint(args.checkpoint, base_model=args.base_model)
    if args.merged:
        print(to_merged(model, args.merged, dtype=args.dtype, tokenizer=tokenizer, overwrite=args.overwrite))
    if args.lora:
        print(to_lora(model, args.lora, overwrite=args.overwrite))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """`inilora-hf compare`: run `inilora_hf.compare` and print the summary table and the output paths."""
    options: dict[str, dict[str, object]] = {}
    for variant, key, value in args.option:
        options.setdefault(variant, {})[key] = value
    compare(
        args.model,
        args.dataset,
        variants=args.variants,
        seeds=args.seeds,
        output_dir=args.output_dir,
        task=args.task,
        text_field=args.text_field,
        label_field=args.label_field,
        eval_dataset=args.eval_dataset,
        eval_split=args.eval_split,
        baseline=args.baseline,
        rank=args.rank,
        lora_alpha=args.lora_alpha,
        target_modules=args.targets,
        learning_rate=args.learning_rate,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        options=options,
        resamples=args.resamples,
        cache_dir=args.cache_dir,
        overwrite=args.overwrite,
    )
    print((Path(args.output_dir) / "summary.md").read_text())
    print(f"results: {Path(args.output_dir) / 'results.json'}")
    return 0
