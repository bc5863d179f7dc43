"""The `inilora-hf` console script: demo, compute, inspect, push, pull, convert, compare.

Importing this module is light (argparse, no torch): `--help`, argument errors and existing output folders are
answered at once; the commands themselves (`inilora_hf.commands`, which loads torch, transformers and peft) are
imported only when one runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import textwrap
from collections.abc import Sequence
from typing import Any, NoReturn

from inilora_hf.log import get_logger, set_verbosity
from inilora_hf.output_dirs import check_output_dir

# The built-in variant names, listed in --help without importing the registry (which needs torch); a test keeps
# this equal to `inilora_hf.available_variants()` in a fresh process.
BUILTIN_VARIANTS = (
    "corda",
    "eva",
    "gaussian",
    "inilora",
    "inilora-alpha",
    "inilora-beta",
    "lora",
    "lora-sb",
    "lora_ga",
    "mica",
    "milora",
    "olora",
    "orthogonal",
    "pissa",
    "pissa_niter",
)
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what shells report for a command stopped by Ctrl-C


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, but a help line never breaks inside a hyphenated name (`inilora-alpha`)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line that points at --help (instead of the full usage first)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


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


def _parse_pattern(text: str) -> tuple[str, object]:
    """`pattern=value` (split at the last `=`, so a regular expression may contain one), value parsed as in
    `_parse_option`."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"Patterns are MODULE_PATTERN=VALUE, e.g. q_proj=16, got {text!r}.")
    key, raw = text.rsplit("=", 1)
    return key, _parse_option(f"value={raw}")[1]


def _parse_variant_option(text: str) -> tuple[str, str, object]:
    """`variant.key=value` → (variant, key, value), value parsed as in `_parse_option`."""
    name, _, option = text.partition(".")
    if not name or "=" not in option:
        raise argparse.ArgumentTypeError(f"Options are VARIANT.KEY=VALUE, e.g. inilora.steps=2000, got {text!r}.")
    return (name, *_parse_option(option))


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _seed_list(text: str) -> list[int]:
    try:
        return [int(item) for item in _comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"Seeds are comma-separated integers, e.g. 0,1,2, got {text!r}.") from None


def _variant_help(note: str = "") -> str:
    return f"init variant: {', '.join(BUILTIN_VARIANTS)} (default: %(default)s){note}"


def _add_init_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--variant",
        default="inilora",
        help=_variant_help(
            "; lora-sb, eva, corda and lora_ga read calibration data, so they run through the Python API only"
        ),
    )
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r (default: %(default)s)")
    parser.add_argument(
        "--lora-alpha",
        type=float,
        default=None,
        help="LoRA alpha (default: the rank, i.e. scaling 1 as in the IniLoRA recipes)",
    )
    parser.add_argument(
        "--rslora", action="store_true", help="rank-stabilised scaling alpha/sqrt(r) instead of alpha/r"
    )
    parser.add_argument(
        "--targets",
        default=None,
        help="comma-separated names of the target modules, or all-linear (default: PEFT's default for the model "
        "type, e.g. q_proj,v_proj for Llama, c_attn for GPT-2)",
    )
    for flag, field, default in (("--rank-pattern", "rank", "--rank"), ("--alpha-pattern", "alpha", "--lora-alpha")):
        parser.add_argument(
            flag,
            action="append",
            type=_parse_pattern,
            default=[],
            metavar="PATTERN=VALUE",
            help=f"per-module LoRA {field}, repeatable, as PEFT's `{field}_pattern`: a module-name suffix or regular "
            f"expression, e.g. q_proj=16 (default: none, every module uses {default})",
        )
    parser.add_argument(
        "--option",
        "-o",
        action="append",
        type=_parse_option,
        default=[],
        metavar="KEY=VALUE",
        help="variant option, repeatable, e.g. -o steps=20000 -o seed=0 (default: the variant's own "
        "defaults, listed in the README's Variants table)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `inilora-hf` (exposed for tests and docs).

    Example:
        >>> build_parser().parse_args(["inspect", "factors/tiny-pissa"]).path
        'factors/tiny-pissa'
    """
    parser = _Parser(
        prog="inilora-hf",
        description="LoRA-init factor sets: demo, compute, inspect, push, pull, convert, compare.",
        epilog="`inilora-hf COMMAND --help` lists the options of a command with their defaults.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (the demo always does)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="compute a factor set, fine-tune with SFTTrainer, write checkpoints")
    demo.add_argument("--output-dir", default="inilora-demo", help="where everything is written (default: %(default)s)")
    demo.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --output-dir once the new run is complete (without it, such a folder "
        "is refused before any work)",
    )
    demo.add_argument("--model", default=None, help="a Hub id or directory (default: a tiny Llama built from a config)")
    demo.add_argument("--variant", default="inilora", help=_variant_help())
    demo.add_argument("--rank", type=int, default=8, help="LoRA rank r (default: %(default)s)")
    demo.add_argument(
        "--steps", type=int, default=None, help="fit steps of the inilora variant (default: the variant's 20000)"
    )
    demo.add_argument("--train-steps", type=int, default=40, help="SFTTrainer steps (default: %(default)s)")
    demo.add_argument(
        "--cache-dir", default=None, help="factor-set cache (default: $INILORA_HF_CACHE, else $HF_HOME/inilora)"
    )
    demo.set_defaults(handler="cmd_demo", outputs=("output_dir",))

    compute = commands.add_parser(
        "compute",
        help="compute a factor set for a base model and save it (streamed: reads only the target weights)",
    )
    compute.add_argument("base", help="Hub id or directory of the base model (safetensors)")
    compute.add_argument("--out", required=True, help="output folder of the factor set (required)")
    compute.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the factor set already in --out (without it, it is refused before any work)",
    )
    compute.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available, else cpu)")
    compute.add_argument(
        "--max-memory",
        default=None,
        help="memory for weights + working set, e.g. 512MB or 2GB (default: no bound, one group per shape)",
    )
    compute.add_argument("--revision", default=None, help="Hub revision of the base model (default: main)")
    compute.add_argument(
        "--work-dir",
        default=None,
        help="where finished groups are kept so that an interrupted run resumes (default: a folder "
        "in the factor-set cache)",
    )
    _add_init_arguments(compute)
    compute.set_defaults(handler="cmd_compute")  # compute_streamed checks --out before any work

    inspect = commands.add_parser("inspect", help="print a factor set's metadata and per-module fit statistics")
    inspect.add_argument("path", help="factor-set directory or Hub repo id")
    inspect.set_defaults(handler="cmd_inspect")

    push = commands.add_parser("push", help="upload a factor-set directory to a Hub repo, with a model card")
    push.add_argument("path", help="factor-set directory (from `compute` or `save_pretrained`)")
    push.add_argument("repo_id", help="Hub repo id, e.g. my-org/llama-3.2-1b-inilora-r8 (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--revision", default=None, help="branch to commit to, created if missing (default: main)")
    push.add_argument("--include-residual", action="store_true", help="also upload the stored residual R")
    push.set_defaults(handler="cmd_push")

    pull = commands.add_parser("pull", help="download a factor set into the Hugging Face cache and print its path")
    pull.add_argument("repo_id", help="Hub repo id of a factor set")
    pull.add_argument("--revision", default=None, help="branch, tag or commit sha (default: main)")
    pull.set_defaults(handler="cmd_pull")

    convert = commands.add_parser(
        "convert",
        help="turn a training checkpoint into a merged transformers checkpoint and/or a standard LoRA adapter",
    )
    convert.add_argument("checkpoint", help="a checkpoint-N folder or save_model() output of an inilora_hf run")
    convert.add_argument(
        "--merged",
        metavar="DIR",
        default=None,
        help="write a merged transformers checkpoint here (default: none; give --merged or --lora)",
    )
    convert.add_argument(
        "--lora",
        metavar="DIR",
        default=None,
        help="write a standard PEFT LoRA adapter for the original base here (default: none)",
    )
    convert.add_argument(
        "--overwrite",
        action="store_true",
        help="replace non-empty --merged / --lora folders (without it, they are refused before any work)",
    )
    convert.add_argument("--dtype", default=None, help="dtype of the merged weights (default: the base model's)")
    convert.add_argument(
        "--base-model", default=None, help="the original base model (default: the one recorded in the checkpoint)"
    )
    convert.set_defaults(handler="cmd_convert", outputs=("merged", "lora"))
    _add_compare_parser(commands)
    return parser


def _add_compare_parser(commands: argparse._SubParsersAction) -> None:
    compare = commands.add_parser(
        "compare",
        help="fine-tune with several init variants × seeds, identically but for the init, and compare them",
        description="Train every variant × seed with transformers.Trainer, evaluate on the same examples, and write "
        "OUT/results.json, OUT/summary.md (mean ± std; Δ to the baseline with a 95 %% CI and p from a paired "
        "bootstrap over eval examples and from a paired t-test over seeds) and, with matplotlib, OUT/loss.png and "
        "OUT/metric.png. A re-run with the same settings skips finished runs; the same command started several "
        "times on one OUT shares the runs (give each its cores with OMP_NUM_THREADS).",
    )
    compare.add_argument("--model", required=True, help="Hub id or directory of the base model and its tokenizer")
    compare.add_argument(
        "--dataset", required=True, help="a .jsonl/.json/.csv/.parquet file or a Hub dataset id (its train split)"
    )
    compare.add_argument("--output-dir", required=True, help="where runs/, results.json, summary.md, plots go")
    compare.add_argument("--task", choices=("causal-lm", "seq-cls"), default="causal-lm", help="(default: %(default)s)")
    compare.add_argument("--text-field", default="text", help="column with the text (default: %(default)s)")
    compare.add_argument("--label-field", default="label", help="column with the class, seq-cls (default: %(default)s)")
    compare.add_argument(
        "--variants",
        type=_comma_list,
        metavar="V1,V2,...",
        default="lora,inilora,pissa",
        help="comma-separated (default: %(default)s)",
    )
    compare.add_argument(
        "--seeds", type=_seed_list, metavar="S1,S2,...", default="0,1,2", help="comma-separated (default: %(default)s)"
    )
    compare.add_argument("--baseline", default="lora", help="variant the others are tested against (default: lora)")
    compare.add_argument("--rank", type=int, default=8, help="LoRA rank r (default: %(default)s)")
    compare.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    compare.add_argument(
        "--targets",
        type=_comma_list,
        metavar="M1,M2,...",
        default="q_proj,v_proj",
        help="target modules (default: %(default)s)",
    )
    compare.add_argument("--learning-rate", type=float, default=1e-3, help="peak, linear decay (default: %(default)s)")
    compare.add_argument("--max-steps", type=int, default=100, help="training steps per run (default: %(default)s)")
    compare.add_argument("--batch-size", type=int, default=16, help="training batch size (default: %(default)s)")
    compare.add_argument(
        "--max-length", type=int, default=128, help="truncate texts to this many tokens (default: %(default)s)"
    )
    evaluation = compare.add_mutually_exclusive_group()
    evaluation.add_argument(
        "--eval-split", type=float, default=0.2, help="held-out fraction of --dataset (default: %(default)s)"
    )
    evaluation.add_argument(
        "--eval-dataset", default=None, help="evaluation data instead of --eval-split (default: none)"
    )
    compare.add_argument(
        "--option",
        "-o",
        action="append",
        type=_parse_variant_option,
        default=[],
        metavar="VARIANT.KEY=VALUE",
        help="variant option, repeatable, e.g. -o inilora.steps=2000 (default: the variant's own defaults; a "
        "variant's `seed` is the run's seed)",
    )
    compare.add_argument("--resamples", type=int, default=10000, help="bootstrap resamples (default: %(default)s)")
    compare.add_argument(
        "--cache-dir", default=None, help="factor-set cache (default: $INILORA_HF_CACHE, else $HF_HOME/inilora)"
    )
    compare.add_argument(
        "--overwrite", action="store_true", help="delete the runs already in --output-dir and start over"
    )
    compare.set_defaults(handler="cmd_compare")


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse, before any work, what can be refused without loading anything: no output, or existing output folders
    (the `outputs` a subcommand declares)."""
    if args.command == "convert" and not (args.merged or args.lora):
        raise ValueError("nothing to write: pass --merged DIR and/or --lora DIR.")
    for dest in getattr(args, "outputs", ()):
        if getattr(args, dest) is not None:
            check_output_dir(getattr(args, dest), overwrite=args.overwrite)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `inilora-hf` console script; returns the exit status.

    Errors in the input (bad arguments, a missing or existing folder, an unknown variant, ...) print one line on
    stderr and return 2; Ctrl-C prints one line and returns 130.

    Example:
        >>> main(["inspect", "factors/tiny-pissa"])                  # doctest: +SKIP
        0
    """
    args = build_parser().parse_args(argv)
    if args.verbose or args.command == "demo":
        set_verbosity(logging.INFO)
    elif args.command == "compare":  # a line per finished run, without the per-run init reports
        get_logger("inilora_hf.comparison").setLevel(logging.INFO)
    if not args.verbose:
        # bitsandbytes warns on import, through an unconfigured logger (so on stderr), that an optional CPU kernel
        # package is missing; it would turn every one-line error into two lines. Shown with -v.
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        _check_arguments(args)
        # The one place the heavy layers are imported, so that --help and argument errors answer at once.
        commands = importlib.import_module(".commands", __package__)
        return getattr(commands, args.handler)(args)
    except (ValueError, TypeError, OSError) as error:
        print(f"inilora-hf {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"inilora-hf {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
