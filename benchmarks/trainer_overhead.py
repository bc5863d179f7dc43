"""What an inilora init costs on the trainer side, measured in one process against plain PEFT LoRA.

    python -m benchmarks.trainer_overhead [--threads 1] [--repeats 5] [--steps 20] [--hidden 512] [--layers 4]
                                          [--init-hidden 1024] [--init-layers 4]

The default run takes about 2 CPU-minutes (one thread); ``--init-hidden 2048`` (a 299 M-parameter larger model
instead of 107 M) is opt-in and takes about 3.

1. Training step: an `inilora` model vs a plain PEFT LoRA model of the same rank and targets (same shapes,
   same batch, AdamW on the LoRA parameters); after two warm-up steps each, the two models' steps alternate one
   by one, `--steps` timed steps each; min and median ms/step and their ratios.
2. Init on a cache hit (a new `inilora_init(dir)()` each time, as in a new process) vs the bare
   `AutoModelForCausalLM.from_pretrained(dir)` it has to do anyway, and vs plain `get_peft_model` on that load,
   for the training model and a larger one, and three load paths: a checkpoint loaded in its own dtype (fp32 or
   bf16: transformers memory-maps it, the weights are read later, on first use) and a bf16 checkpoint loaded in
   fp32 (a copying load). "remembered" is the usual hit (the fingerprints of the unchanged checkpoint files are
   in the cache's memo); "hashed" clears the memo first (the first use of a checkpoint whose factor set came
   from elsewhere, e.g. the Hub), so every target weight is read and sha256-hashed. All eight measures of a
   load path run interleaved, `--repeats` times each.

Threads are pinned (`--threads`, default 1, see :mod:`benchmarks.harness`).
"""

from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
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
from inilora_hf import inilora_init
from inilora_hf.factorsets.fingerprint_memo import MEMO_DIR

# The solver only decides how the factor set is computed once; a cache hit and a training step do not depend
# on it, and the randomized SVD shortens the set-up of the larger model.
SOLVER = "rsvd"
WARMUP_STEPS = 2
BUILDERS = ("load", "peft", "remembered", "hashed")
# (dtype saved, dtype loaded): own dtype (memory-mapped load) and bf16 → fp32 (copying load).
LOAD_PATHS = ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32))


def lora_config() -> LoraConfig:
    """Plain PEFT LoRA with the rank and targets of the inilora models."""
    return LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def llama_config(hidden: int, layers: int, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=vocab_size,
    )


def millions_of_parameters(config: LlamaConfig) -> float:
    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(config).parameters()) / 1e6


def training_step(model: torch.nn.Module, batch: torch.Tensor) -> Callable[[], float]:
    """One forward+backward+AdamW step on `model`'s trainable parameters, as a callable returning its ms."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step() -> None:
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return lambda: 1000 * timed(step)[0]


def training_step_ms(base_dir: str, cache_dir: str, batch: torch.Tensor, steps: int) -> dict[str, list[float]]:
    """ms of each timed training step of the inilora and the plain PEFT model, the two interleaved step by step."""
    init = inilora_init(base_dir, variant="inilora", cache_dir=cache_dir, solver=SOLVER)
    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), lora_config())
    step = {"inilora": training_step(init(), batch), "plain": training_step(plain, batch)}
    for _ in range(WARMUP_STEPS):
        for warm_up in step.values():
            warm_up()
    return interleaved(step, steps)


def init_costs(base_dir: Path, load_dtype: torch.dtype, repeats: int) -> dict[tuple[str, bool], list[float]]:
    """Seconds of each repeat of: bare load, load + get_peft_model, and inilora cache hits with and without the
    memo; each alone (`False`) and followed by a one-token forward pass, which reads every weight once (`True`)."""
    cache_dir = Path(tempfile.mkdtemp(prefix="overhead-cache-"))

    def inilora() -> torch.nn.Module:
        return inilora_init(base_dir, variant="inilora", cache_dir=cache_dir, solver=SOLVER, dtype=load_dtype)()

    def hashed() -> torch.nn.Module:
        shutil.rmtree(cache_dir / MEMO_DIR, ignore_errors=True)
        return inilora()

    builders: dict[str, Callable[[], torch.nn.Module]] = {
        "load": lambda: AutoModelForCausalLM.from_pretrained(base_dir, dtype=load_dtype),
        "peft": lambda: get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=load_dtype), lora_config()),
        "remembered": inilora,
        "hashed": hashed,
    }
    token = torch.zeros(1, 1, dtype=torch.long)

    def measure(build: Callable[[], torch.nn.Module], forward: bool) -> Callable[[], float]:
        def run() -> float:
            gc.collect()  # outside the timed part: every measure starts from the same heap

            def built() -> None:
                model = build()
                if forward:
                    with torch.no_grad():
                        model(input_ids=token)

            return timed(built)[0]

        return run

    inilora()  # fills the cache and the memo; every inilora call below is a cache hit ("hashed" rewrites the memo)
    methods = {(name, forward): measure(builders[name], forward) for forward in (False, True) for name in BUILDERS}
    runs = interleaved(methods, repeats)
    shutil.rmtree(cache_dir)
    return runs


def _cell(runs: dict[tuple[str, bool], list[float]], name: str, forward: bool) -> str:
    """`min / median`, and for the non-baseline builders the min's excess over the bare load's min."""
    fastest, median = min_median(runs[(name, forward)])
    text = f"{fastest:.3f} / {median:.3f}"
    if name == "load":
        return text
    base = min(runs[("load", forward)])
    return f"{text} ({100 * (fastest - base) / base:+.0f} %)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per model (default 20)")
    parser.add_argument("--init-hidden", type=int, default=1024, help="hidden size of the larger init model")
    parser.add_argument("--init-layers", type=int, default=4)
    add_run_arguments(parser, repeats=5)
    args = parser.parse_args(argv)
    pin_threads(args.threads)
    hf_logging.disable_progress_bar()
    print(run_header(args.repeats), "\n")

    config = llama_config(args.hidden, args.layers, vocab_size=2048)
    torch.manual_seed(0)
    base_dir = tempfile.mkdtemp(prefix="overhead-base-")
    cache_dir = tempfile.mkdtemp(prefix="overhead-cache-")
    LlamaForCausalLM(config).save_pretrained(base_dir)
    batch = torch.randint(0, config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0))
    step_ms = training_step_ms(base_dir, cache_dir, batch, args.steps)
    shutil.rmtree(base_dir)
    shutil.rmtree(cache_dir)
    print(
        f"Training step: Llama hidden={args.hidden} layers={args.layers} "
        f"({millions_of_parameters(config):.1f} M params), q/v r=8, batch 8×128, {WARMUP_STEPS} warm-up steps, "
        f"then {args.steps} steps of each model, alternating\n"
    )
    inilora_min, inilora_median = min_median(step_ms["inilora"])
    plain_min, plain_median = min_median(step_ms["plain"])
    print(
        markdown_table(
            ["training step (ms)", "inilora", "plain PEFT LoRA", "inilora ÷ plain"],
            [
                ["min", f"{inilora_min:.1f}", f"{plain_min:.1f}", f"{inilora_min / plain_min:.3f}"],
                ["median", f"{inilora_median:.1f}", f"{plain_median:.1f}", f"{inilora_median / plain_median:.3f}"],
            ],
            numeric=[False, True, True, True],
        )
    )

    print(
        f"\nInit on a cache hit (a new inilora_init each time), {args.repeats} interleaved repeats; cells: min / "
        "median (s), and '+x %' = the min's time added to the bare load's min. Second line of each pair: followed "
        "by a one-token forward pass (reads every weight)\n"
    )
    rows = []
    for hidden, layers, vocab in ((args.hidden, args.layers, 2048), (args.init_hidden, args.init_layers, 32000)):
        config = llama_config(hidden, layers, vocab)
        model_label = f"hidden {hidden}, {layers} layers ({millions_of_parameters(config):.0f} M)"
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        root = Path(tempfile.mkdtemp(prefix="overhead-base-"))
        for saved_dtype in dict.fromkeys(saved for saved, _loaded in LOAD_PATHS):  # fp32 first, then rounded
            model.to(saved_dtype).save_pretrained(root / str(saved_dtype))
        del model
        for saved_dtype, load_dtype in LOAD_PATHS:
            runs = init_costs(root / str(saved_dtype), load_dtype, args.repeats)
            lazy = "mmap" if saved_dtype == load_dtype else "copy"
            for forward in (False, True):
                rows.append(
                    [
                        model_label,
                        f"{str(saved_dtype)[6:]} → {str(load_dtype)[6:]} ({lazy})",
                        "1-token forward" if forward else "—",
                        *(_cell(runs, name, forward) for name in BUILDERS),
                    ]
                )
        shutil.rmtree(root)
    print(
        markdown_table(
            [
                "model",
                "checkpoint → loaded as",
                "then",
                "bare load (s)",
                "plain PEFT load+wrap (s)",
                "inilora hit, remembered (s)",
                "inilora hit, hashed (s)",
            ],
            rows,
            numeric=[False, False, False, True, True, True, True],
        )
    )
    print(f"\n{loadavg_line()}")


if __name__ == "__main__":
    main()
