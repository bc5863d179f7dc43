"""Peak memory of the streamed `compute` versus loading the whole model.

Run ``python -m benchmarks.streaming [--threads 1] [--repeats 2] [--variant pissa] [--max-memory 32MB,256MB]
[--layers 4] [--hidden 1024]``; ``--layers 8`` (a 277 MB checkpoint) is opt-in and takes about 1.5× the CPU time.

It writes a synthetic sharded bf16 checkpoint of a Llama-like model (by default 4 layers, hidden 1024, q/k/v/o
all 1024×1024, MLP 4096: ~150 MB), then runs each of these in a fresh subprocess and reads its peak resident set
size (``VmHWM``):

* ``runtime only``: imports torch / transformers / inilora_hf and builds the meta-device module tree (what
  every run pays before touching a weight);
* ``streamed``: `inilora_hf.factorsets.streaming.compute_streamed` with each ``--max-memory`` value and without a bound;
* ``in memory``: `inilora_init(..., use_cache=False).prepare()` + `save_pretrained`, i.e. load the model, then
  compute: with ``dtype=torch.float32`` (what the `compute` command did before streaming), and in the stored
  dtype (transformers maps the safetensors files without copying, so only the pages it touches are resident).

The runs are interleaved, ``--repeats`` times each, with threads pinned in every subprocess (``--threads``,
default 1, see :mod:`benchmarks.harness`); the table gives min and median of the peak RSS and of the
subprocess's wall time (interpreter start and imports included). Each subprocess spends several CPU-seconds
importing torch, transformers and peft, so the default is 2 repeats (they mainly serve the wall-time column;
the peak RSS moves little between them). The factors of every run are compared with
the fp32 in-memory run (max |Δ|), and a markdown table is printed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from benchmarks.harness import (
    add_run_arguments,
    interleaved,
    loadavg_line,
    markdown_table,
    min_median,
    pin_threads,
    run_header,
    timed,
)
from inilora_hf import FactorSet, InitConfig, inilora_init
from inilora_hf.factorsets.cache import CACHE_ENV_VAR
from inilora_hf.factorsets.streaming import compute_streamed

MB = 1e6
NO_BOUND = "none"
DEFAULT_REPEATS = 2
BASELINE = "in memory, `dtype=float32` (old `compute` command)"


def peak_rss_bytes() -> int:
    """This process's peak resident set size (`VmHWM` on Linux, else `ru_maxrss`)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def build_checkpoint(directory: Path, *, layers: int, hidden: int, intermediate: int, vocab: int) -> int:
    """Save a random Llama-like bf16 checkpoint in 100 MB shards; return its size in bytes."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,  # full-size k/v: q_proj and v_proj are both hidden × hidden
        vocab_size=vocab,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(directory, max_shard_size="100MB")
    del model
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def child(mode: str, checkpoint: str, out: str, variant: str, rank: int, options: dict, max_memory: str | None) -> None:
    """One measured run; prints a JSON line with its peak RSS and the threads torch used."""
    config = InitConfig(variant, rank=rank, options=options)
    if mode == "runtime":
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint))
    elif mode == "streamed":
        compute_streamed(checkpoint, config, out, max_memory=max_memory, device="cpu")
    elif mode in ("in-memory-fp32", "in-memory-stored"):
        dtype = torch.float32 if mode == "in-memory-fp32" else "auto"
        init = inilora_init(
            checkpoint, variant=variant, rank=rank, use_cache=False, device="cpu", dtype=dtype, **options
        )
        init.prepare().save_pretrained(out)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    print(json.dumps({"peak_rss": peak_rss_bytes(), "threads": torch.get_num_threads()}))


def run_child(mode: str, args: argparse.Namespace, checkpoint: Path, out: Path, max_memory: str | None) -> dict:
    """Run one measured subprocess (threads pinned through the inherited environment); its peak RSS and the
    wall time of the whole subprocess, interpreter start and imports included."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.streaming",
        "--child",
        mode,
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(out),
        "--variant",
        args.variant,
        "--rank",
        str(args.rank),
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
        "--max-memory",
        max_memory or NO_BOUND,
    ]
    env = {
        **os.environ,
        CACHE_ENV_VAR: str(checkpoint.parent / "cache"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    seconds, result = timed(
        lambda: subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=args.timeout)
    )
    if result.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{result.stderr[-4000:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "seconds": seconds}


def max_factor_difference(left: Path, right: Path) -> float:
    a, b = FactorSet.from_pretrained(left), FactorSet.from_pretrained(right)
    return max(
        max(
            (a.factors[n].lora_A - b.factors[n].lora_A).abs().max().item(),
            (a.factors[n].lora_B - b.factors[n].lora_B).abs().max().item(),
        )
        for n in b.factors
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="pissa")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="inilora fit steps (ignored by other variants)")
    parser.add_argument("--max-memory", default="32MB,256MB", help="comma-separated bounds to measure")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=4096)
    add_run_arguments(parser, repeats=DEFAULT_REPEATS)
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    pin_threads(args.threads)
    options = {"steps": args.steps} if args.variant == "inilora" else {}
    if args.child:
        bound = None if args.max_memory == NO_BOUND else args.max_memory
        child(args.child, args.checkpoint, args.out, args.variant, args.rank, options, bound)
        return

    hf_logging.disable_progress_bar()
    command = "python -m benchmarks.streaming " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"`{command.strip()}`\n")
    print(run_header(args.repeats), "\n")
    with tempfile.TemporaryDirectory(prefix="inilora-stream-bench-") as tmp:
        root = Path(tmp)
        checkpoint = root / "checkpoint"
        size = build_checkpoint(
            checkpoint, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, vocab=args.vocab
        )
        targets = 2 * args.layers * args.hidden * args.hidden * 2
        bounds = [bound for bound in args.max_memory.split(",") if bound]
        runs = {
            "runtime only (imports + meta model)": ("runtime", None),
            **{f"streamed, `max_memory={bound}`": ("streamed", bound) for bound in bounds},
            "streamed, no bound (one group per shape)": ("streamed", None),
            "in memory, stored dtype (mmap-backed load, then compute)": ("in-memory-stored", None),
            BASELINE: ("in-memory-fp32", None),
        }
        # The first repeat's factor sets are kept for the comparison; later repeats' are deleted at once.
        outputs: dict[str, Path] = {}

        run_number = itertools.count()

        def measure(label: str) -> dict:
            mode, bound = runs[label]
            out = root / f"out-{next(run_number)}"
            measured = run_child(mode, args, checkpoint, out, bound)
            if label in outputs:
                shutil.rmtree(out, ignore_errors=True)
            else:
                outputs[label] = out
            return measured

        measured = interleaved({label: partial(measure, label) for label in runs}, args.repeats)
        difference = max(
            max_factor_difference(outputs[label], outputs[BASELINE]) for label in runs if runs[label][0] != "runtime"
        )

    print(
        f"checkpoint: {size / MB:.0f} MB bf16 in 100 MB shards ({args.layers} layers, hidden {args.hidden}); "
        f"targets q_proj+v_proj: {targets / MB:.0f} MB (bf16); variant {args.variant}, rank {args.rank}; "
        f"torch threads in the subprocesses: {sorted({m['threads'] for ms in measured.values() for m in ms})}\n"
    )
    baseline = min_median([m["peak_rss"] for m in measured[next(iter(runs))]])[1]
    rows = []
    for label, repeats in measured.items():
        rss_min, rss_median = min_median([m["peak_rss"] for m in repeats])
        wall_min, wall_median = min_median([m["seconds"] for m in repeats])
        rows.append(
            [
                label,
                f"{rss_min / MB:.0f} / {rss_median / MB:.0f}",
                f"{(rss_median - baseline) / MB:+.0f}",
                f"{wall_min:.1f} / {wall_median:.1f}",
            ]
        )
    print(
        markdown_table(
            ["run", "peak RSS, min / median (MB)", "median above runtime only (MB)", "wall, min / median (s)"],
            rows,
            numeric=[False, True, True, True],
        )
    )
    print(f"\nevery run vs in memory with dtype=float32: max |Δ| of the factors = {difference:.2e}; {loadavg_line()}")


if __name__ == "__main__":
    main()
