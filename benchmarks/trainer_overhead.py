"""What an inilora init costs on the trainer side, measured in one process against plain PEFT LoRA.

    python -m benchmarks.trainer_overhead [--hidden 512] [--layers 4] [--steps 20] [--repeats 5]
                                          [--init-hidden 2048] [--init-layers 4]

1. Training step: an `inilora` model vs a plain PEFT LoRA model of the same rank and targets (same shapes,
   same batch, AdamW on the LoRA parameters), interleaved repeats; median ms/step and the ratio.
2. Init on a cache hit (a new `inilora_init(dir)()` each time, as in a new process) vs the bare
   `AutoModelForCausalLM.from_pretrained(dir)` it has to do anyway, and vs plain `get_peft_model` on that load,
   for the training model and a larger one, and three load paths: a checkpoint loaded in its own dtype (fp32 or
   bf16: transformers memory-maps it, the weights are read later, on first use) and a bf16 checkpoint loaded in
   fp32 (a copying load). "remembered" is the usual hit (the fingerprints of the unchanged checkpoint files are
   in the cache's memo); "hashed" clears the memo first (the first use of a checkpoint whose factor set came
   from elsewhere, e.g. the Hub), so every target weight is read and sha256-hashed.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from inilora_hf import inilora_init
from inilora_hf.factorsets.fingerprint_memo import MEMO_DIR

LORA = dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def train_ms_per_step(model: torch.nn.Module, batch: torch.Tensor, steps: int) -> float:
    """Median wall time of one forward+backward+AdamW step, after two warm-up steps."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times = []
    for step in range(steps + 2):
        started = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def seconds(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def llama_config(hidden: int, layers: int, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=vocab_size,
    )


def init_costs(
    config: LlamaConfig, saved_dtype: torch.dtype, load_dtype: torch.dtype, repeats: int
) -> dict[tuple[str, bool], float]:
    """Median seconds of: bare load, load + get_peft_model, and inilora cache hits with and without the memo;
    each alone (`False`) and followed by a one-token forward pass, which reads every weight once (`True`)."""
    base_dir = tempfile.mkdtemp(prefix="overhead-base-")
    cache_dir = Path(tempfile.mkdtemp(prefix="overhead-cache-"))
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(saved_dtype).save_pretrained(base_dir)

    def inilora():
        return inilora_init(base_dir, variant="inilora", cache_dir=cache_dir, solver="svd", dtype=load_dtype)()

    def hashed():
        shutil.rmtree(cache_dir / MEMO_DIR, ignore_errors=True)
        return inilora()

    builders = {
        "load": lambda: AutoModelForCausalLM.from_pretrained(base_dir, dtype=load_dtype),
        "peft": lambda: get_peft_model(
            AutoModelForCausalLM.from_pretrained(base_dir, dtype=load_dtype), LoraConfig(**LORA)
        ),
        "remembered": inilora,
        "hashed": hashed,
    }
    token = torch.zeros(1, 1, dtype=torch.long)
    inilora()  # fills the cache and the memo; every inilora call below is a cache hit ("hashed" rewrites the memo)
    times: dict[tuple[str, bool], list[float]] = {}
    for _ in range(repeats):
        for forward in (False, True):
            for name, build in builders.items():
                gc.collect()
                started = time.perf_counter()
                model = build()
                if forward:
                    with torch.no_grad():
                        model(input_ids=token)
                times.setdefault((name, forward), []).append(time.perf_counter() - started)
                del model
    shutil.rmtree(base_dir)
    shutil.rmtree(cache_dir)
    return {key: statistics.median(values) for key, values in times.items()}


def _cell(times: dict[tuple[str, bool], float], name: str, forward: bool) -> str:
    """`name`'s time and its overhead over the bare load, e.g. `1.234 (+5 %)`."""
    base = times[("load", forward)]
    return f"{times[(name, forward)]:.3f} ({100 * (times[(name, forward)] - base) / base:+.0f} %)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--init-hidden", type=int, default=2048)
    parser.add_argument("--init-layers", type=int, default=4)
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    config = llama_config(args.hidden, args.layers, vocab_size=2048)
    torch.manual_seed(0)
    base_dir = tempfile.mkdtemp(prefix="overhead-base-")
    cache_dir = tempfile.mkdtemp(prefix="overhead-cache-")
    LlamaForCausalLM(config).save_pretrained(base_dir)
    batch = torch.randint(0, config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0))

    init = inilora_init(base_dir, variant="inilora", cache_dir=cache_dir, solver="svd")
    init.prepare()
    inilora_steps, plain_steps = [], []
    for _ in range(args.repeats):
        inilora_steps.append(train_ms_per_step(init(), batch, args.steps))
        plain = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(**LORA))
        plain_steps.append(train_ms_per_step(plain, batch, args.steps))
    params = sum(p.numel() for p in LlamaForCausalLM(config).parameters()) / 1e6
    print(
        f"Training step: Llama hidden={args.hidden} layers={args.layers} ({params:.1f} M params), q/v r=8, "
        f"batch 8×128, torch threads={torch.get_num_threads()}, {args.repeats} interleaved repeats, medians\n"
    )
    print("| measure | inilora | plain PEFT LoRA | ratio |")
    print("|---|---:|---:|---:|")
    inilora_ms, plain_ms = statistics.median(inilora_steps), statistics.median(plain_steps)
    print(f"| training step (ms) | {inilora_ms:.1f} | {plain_ms:.1f} | {inilora_ms / plain_ms:.3f} |")

    print(
        f"\nInit on a cache hit (a new inilora_init each time), {args.repeats} repeats, medians; '+x %' = time "
        "added to the bare load. Second line of each pair: followed by a one-token forward pass (reads every weight)\n"
    )
    print(
        "| model | checkpoint → loaded as | then | bare load (s) | plain PEFT load+wrap (s) "
        "| inilora hit, remembered (s) | inilora hit, hashed (s) |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    models = [(args.hidden, args.layers, 2048), (args.init_hidden, args.init_layers, 32000)]
    paths = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]
    for hidden, layers, vocab in models:
        config = llama_config(hidden, layers, vocab)
        params = sum(p.numel() for p in LlamaForCausalLM(config).parameters()) / 1e6
        for saved_dtype, load_dtype in paths:
            t = init_costs(config, saved_dtype, load_dtype, args.repeats)
            lazy = "mmap" if saved_dtype == load_dtype else "copy"
            for forward in (False, True):
                cells = " | ".join(_cell(t, name, forward) for name in ("peft", "remembered", "hashed"))
                print(
                    f"| hidden {hidden}, {layers} layers ({params:.0f} M) | {str(saved_dtype)[6:]} → "
                    f"{str(load_dtype)[6:]} ({lazy}) | {'1-token forward' if forward else '—'} "
                    f"| {t[('load', forward)]:.3f} | {cells} |"
                )


if __name__ == "__main__":
    main()
