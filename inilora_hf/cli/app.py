"""The `inilora-hf` console script: demo, compute, inspect, push, pull, convert."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from inilora_hf.log import set_verbosity


def _parse_option(text: str) -> tuple[str, object]:
    """`key=value` with value parsed as int, float, None/true/false, or kept as a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"Variant options are key=value, got {text!r}.")
    key, raw = text.split("=", 1)
    lowered = raw.lower()
    if lowered in ("none", "null"):
        return key, None
    if lowered in ("true", "false"):
        return key, lowered == "true"
    for kind in (int, float):
        try:
            return key, kind(raw)
        except ValueError:
            pass
    return key, raw


def _add_init_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", default="inilora", help="init variant (default: inilora)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=None, help="default: rank (scaling 1)")
    parser.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha/sqrt(r)")
    parser.add_argument("--targets", default="q_proj,v_proj", help="comma-separated module names (default q_proj,v_proj)")
    parser.add_argument("--option", "-o", action="append", type=_parse_option, default=[], metavar="KEY=VALUE",
                        help="variant option, repeatable (e.g. -o steps=20000 -o seed=0)")


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(
        args.output_dir,
        model=args.model,
        variant=args.variant,
        rank=args.rank,
        fit_steps=args.steps,
        train_steps=args.train_steps,
        cache_dir=args.cache_dir,
    )
    print(result.init_report.summary())
    print(f"\nfactor set: {result.factor_source} ({result.seconds['factor set']:.1f} s)")
    print(f"training: {len(result.losses)} steps in {result.seconds['training']:.1f} s, "
          f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
    print(f"merged checkpoint reproduces the trained model: max |Δlogits| = {result.merged_max_logit_diff:.2e}")
    for name, path in result.paths.items():
        print(f"{name + ':':<28} {path}")
    return 0


def cmd_compute(args: argparse.Namespace) -> int:
    from inilora_hf.factorsets.streaming import compute_streamed
    from inilora_hf.variants.config import InitConfig

    config = InitConfig(
        variant=args.variant,
        rank=args.rank,
        lora_alpha=args.lora_alpha,
        use_rslora=args.rslora,
        target_modules=args.targets.split(","),
        options=dict(args.option),
    )
    factor_set = compute_streamed(
        args.base,
        config,
        args.out,
        max_memory=args.max_memory,
        device=args.device,
        revision=args.revision,
        work_dir=args.work_dir,
    )
    print(f"wrote {len(factor_set.factors)} modules to {args.out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from inilora_hf.factorsets.factor_set import FactorSet

    factor_set = FactorSet.from_pretrained(args.path)
    config = factor_set.config
    print(f"variant: {config.variant}   rank: {config.rank}   lora_alpha: {config.lora_alpha:g}   "
          f"rslora: {config.use_rslora}   scaling: {config.scaling:g}")
    print(f"targets: {config.target_modules}   options: {config.options}")
    print(f"base model: {factor_set.base_model} (revision {factor_set.base_revision})   "
          f"residual stored: {factor_set.has_residual}")
    for key, value in sorted(factor_set.info.items()):
        if key != "versions":
            print(f"{key}: {value}")
    print(f"\n{'module':<52} {'shape':>11} {'fit MSE':>10} {'optimal':>10} {'ratio':>8}")
    for name in sorted(factor_set.factors):
        stats = factor_set.stats.get(name, {})
        shape = "x".join(map(str, factor_set.fingerprints[name]["shape"]))
        print(f"{name[-52:]:<52} {shape:>11} {stats.get('mse', float('nan')):>10.3e} "
              f"{stats.get('optimal_mse', float('nan')):>10.3e} {stats.get('mse_ratio', float('nan')):>8.4f}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from inilora_hf.factorsets.factor_set import FactorSet

    factor_set = FactorSet.from_pretrained(args.path)
    info = factor_set.push_to_hub(
        args.repo_id, private=args.private or None, revision=args.revision, include_residual=args.include_residual
    )
    print(f"pushed {len(factor_set.factors)} modules to {info.repo_url.repo_id} (commit {info.oid})")
    print(info.commit_url)
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from inilora_hf.factorsets.factor_set import FactorSet
    from inilora_hf.factorsets.publish import download_factor_set

    path = download_factor_set(args.repo_id, revision=args.revision)
    FactorSet.from_pretrained(path)  # verifies every file against its recorded checksum
    print(path)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from inilora_hf.convert.export import load_checkpoint, to_lora, to_merged

    if not (args.merged or args.lora):
        raise ValueError("Nothing to write: pass --merged DIR and/or --lora DIR.")
    model, tokenizer = load_checkpoint(args.checkpoint, base_model=args.base_model)
    if args.merged:
        print(to_merged(model, args.merged, dtype=args.dtype, tokenizer=tokenizer, overwrite=args.overwrite))
    if args.lora:
        print(to_lora(model, args.lora, overwrite=args.overwrite))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `inilora-hf` (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="inilora-hf", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="compute a factor set, fine-tune with SFTTrainer, write checkpoints")
    demo.add_argument("--output-dir", default="inilora-demo")
    demo.add_argument("--model", default=None, help="a Hub id or directory (default: a tiny model built locally)")
    demo.add_argument("--variant", default="inilora")
    demo.add_argument("--rank", type=int, default=8)
    demo.add_argument("--steps", type=int, default=None, help="IniLoRA fit steps (default 20000)")
    demo.add_argument("--train-steps", type=int, default=40)
    demo.add_argument("--cache-dir", default=None)
    demo.set_defaults(func=cmd_demo)

    compute = commands.add_parser(
        "compute",
        help="compute a factor set for a base model and save it (streamed: reads only the target weights)",
    )
    compute.add_argument("base", help="Hub id or directory of the base model (safetensors)")
    compute.add_argument("--out", required=True, help="output directory")
    compute.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    compute.add_argument("--max-memory", default=None,
                         help="memory for weights + working set, e.g. 512MB or 2GB (default: one group per shape)")
    compute.add_argument("--revision", default=None, help="Hub revision of the base model")
    compute.add_argument("--work-dir", default=None,
                         help="where finished groups are kept so that an interrupted run resumes (default: in the cache)")
    _add_init_arguments(compute)
    compute.set_defaults(func=cmd_compute)

    inspect = commands.add_parser("inspect", help="print a factor set's metadata and per-module fit statistics")
    inspect.add_argument("path", help="factor-set directory or Hub repo id")
    inspect.set_defaults(func=cmd_inspect)

    push = commands.add_parser("push", help="upload a factor-set directory to a Hub repo, with a model card")
    push.add_argument("path", help="factor-set directory (from `compute` or `save_pretrained`)")
    push.add_argument("repo_id", help="Hub repo id, e.g. my-org/llama-3.2-1b-inilora-r8 (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--revision", default=None, help="branch to commit to (created if missing; default main)")
    push.add_argument("--include-residual", action="store_true", help="also upload the stored residual R")
    push.set_defaults(func=cmd_push)

    pull = commands.add_parser("pull", help="download a factor set into the Hugging Face cache and print its path")
    pull.add_argument("repo_id", help="Hub repo id of a factor set")
    pull.add_argument("--revision", default=None, help="branch, tag or commit sha (default main)")
    pull.set_defaults(func=cmd_pull)

    convert = commands.add_parser(
        "convert", help="turn a training checkpoint into a merged transformers checkpoint and/or a standard LoRA adapter"
    )
    convert.add_argument("checkpoint", help="a checkpoint-N folder or save_model() output of an inilora_hf run")
    convert.add_argument("--merged", metavar="DIR", help="write a merged transformers checkpoint here")
    convert.add_argument("--lora", metavar="DIR", help="write a standard PEFT LoRA adapter (for the original base) here")
    convert.add_argument("--dtype", default=None, help="dtype of the merged weights (default: the base model's)")
    convert.add_argument("--base-model", default=None, help="the original base model, if not the recorded one")
    convert.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    convert.set_defaults(func=cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `inilora-hf` console script."""
    args = build_parser().parse_args(argv)
    if args.verbose or args.command == "demo":
        set_verbosity(logging.INFO)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as error:
        print(f"inilora-hf {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
