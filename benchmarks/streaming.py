"""Peak memory of the streamed `compute` versus loading the whole model.

Run ``python -m benchmarks.streaming [--variant pissa] [--max-memory 32MB,256MB] [--layers 8] [--hidden 1024]``.

It writes a synthetic sharded bf16 checkpoint of a Llama-like model (8 layers, hidden 1024, q/k/v/o all
1024×1024, MLP 4096: ~270 MB), then runs each of these in a fresh subprocess and reads its peak resident set
size (``VmHWM``):

* ``runtime only``: imports torch / transformers / inilora_hf and builds the meta-device module tree (what
  every run pays before touching a weight);
* ``streamed``: `inilora_hf.factorsets.streaming.compute_streamed` with each ``--max-memory`` value and without a bound;
* ``in memory``: `inilora_init(..., use_cache=False).prepare()` + `save_pretrained`, i.e. load the model, then
  compute: with ``dtype=torch.float32`` (what the `compute` command did before streaming), and in the stored
  dtype (transformers maps the safetensors files without copying, so only the pages it touches are resident).

The factors of every run are compared with the fp32 in-memory run (max |Δ|), and a markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1e6
NO_BOUND = "none"


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
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

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
    """One measured run; prints a JSON line with its peak RSS and wall time."""
    started = time.perf_counter()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from inilora_hf import InitConfig, inilora_init
    from inilora_hf.factorsets.streaming import compute_streamed

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
    print(json.dumps({"peak_rss": peak_rss_bytes(), "seconds": time.perf_counter() - started}))


def run_child(mode: str, args: argparse.Namespace, checkpoint: Path, out: Path, max_memory: str | None) -> dict:
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
    ]
    command += ["--max-memory", max_memory or NO_BOUND]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def max_factor_difference(left: Path, right: Path) -> float:
    from inilora_hf import FactorSet

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
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the measured runs")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    options = {"steps": args.steps} if args.variant == "inilora" else {}
    if args.child:
        bound = None if args.max_memory == NO_BOUND else args.max_memory
        child(args.child, args.checkpoint, args.out, args.variant, args.rank, options, bound)
        return

    with tempfile.TemporaryDirectory(prefix="inilora-stream-bench-") as tmp:
        root = Path(tmp)
        checkpoint = root / "checkpoint"
        size = build_checkpoint(
            checkpoint, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, vocab=args.vocab
        )
        targets = 2 * args.layers * args.hidden * args.hidden * 2
        bounds = [bound for bound in args.max_memory.split(",") if bound]
        runs = [
            ("runtime only (imports + meta model)", "runtime", None),
            *[(f"streamed, `max_memory={bound}`", "streamed", bound) for bound in bounds],
            ("streamed, no bound (one group per shape)", "streamed", None),
            ("in memory, stored dtype (mmap-backed load, then compute)", "in-memory-stored", None),
            ("in memory, `dtype=float32` (old `compute` command)", "in-memory-fp32", None),
        ]
        rows = []
        for label, mode, max_memory in runs:
            out = root / f"out-{len(rows)}"
            rows.append((label, out, run_child(mode, args, checkpoint, out, max_memory)))
        baseline = rows[0][2]["peak_rss"]
        difference = max(max_factor_difference(out, rows[-1][1]) for _label, out, _m in rows[1:-1])

    command = "python -m benchmarks.streaming " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"`{command.strip()}`\n")
    print(
        f"checkpoint: {size / MB:.0f} MB bf16 in 100 MB shards ({args.layers} layers, hidden {args.hidden}); "
        f"targets q_proj+v_proj: {targets / MB:.0f} MB (bf16); variant {args.variant}, rank {args.rank}; "
        f"OMP_NUM_THREADS={args.threads}\n"
    )
    print("| run | peak RSS (MB) | above runtime only (MB) | wall (s) |")
    print("|---|---:|---:|---:|")
    for label, _out, measured in rows:
        extra = measured["peak_rss"] - baseline
        print(f"| {label} | {measured['peak_rss'] / MB:.0f} | {extra / MB:+.0f} | {measured['seconds']:.1f} |")
    print(f"\nevery run vs in memory with dtype=float32: max |Δ| of the factors = {difference:.2e}")


if __name__ == "__main__":
    main()
