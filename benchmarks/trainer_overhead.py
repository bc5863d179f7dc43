"""What an inilora init costs on the trainer side, measured in one process against plain PEFT LoRA.

    python -m benchmarks.trainer_overhead [--hidden 512] [--layers 4] [--steps 20] [--repeats 5]

1. Training step: an `inilora` model vs a plain PEFT LoRA model of the same rank and targets (same shapes,
   same batch, AdamW on the LoRA parameters), interleaved repeats; median ms/step and the ratio.
2. Init on a cache hit: `inilora_init(dir)()` with the factor set already cached vs the bare
   `AutoModelForCausalLM.from_pretrained(dir)` it has to do anyway, and vs `get_peft_model` on that load.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from inilora_hf import inilora_init


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=8, num_key_value_heads=8, vocab_size=2048,
    )
    base_dir = tempfile.mkdtemp(prefix="overhead-base-")
    cache_dir = tempfile.mkdtemp(prefix="overhead-cache-")
    LlamaForCausalLM(config).save_pretrained(base_dir)
    batch = torch.randint(0, config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0))
    lora = dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"])

    init = inilora_init(base_dir, variant="inilora", cache_dir=cache_dir, solver="svd")
    init.prepare()  # fills the cache; everything below is a cache hit
    inilora_steps, plain_steps = [], []
    for _ in range(args.repeats):
        inilora_steps.append(train_ms_per_step(init(), batch, args.steps))
        plain = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(**lora))
        plain_steps.append(train_ms_per_step(plain, batch, args.steps))

    load, peft_wrap, cache_hit = [], [], []
    for _ in range(args.repeats):
        load.append(seconds(lambda: AutoModelForCausalLM.from_pretrained(base_dir)))
        peft_wrap.append(seconds(lambda: get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(**lora))))
        cache_hit.append(seconds(lambda: inilora_init(base_dir, variant="inilora", cache_dir=cache_dir, solver="svd")()))

    params = sum(p.numel() for p in LlamaForCausalLM(config).parameters()) / 1e6
    print(f"model: Llama hidden={args.hidden} layers={args.layers} ({params:.1f} M params), q/v r=8, batch 8×128, "
          f"torch threads={torch.get_num_threads()}, {args.repeats} repeats, medians\n")
    print("| measure | inilora | plain PEFT LoRA | ratio |")
    print("|---|---:|---:|---:|")
    inilora_ms, plain_ms = statistics.median(inilora_steps), statistics.median(plain_steps)
    print(f"| training step (ms) | {inilora_ms:.1f} | {plain_ms:.1f} | {inilora_ms / plain_ms:.3f} |")
    load_s, wrap_s, hit_s = (statistics.median(x) for x in (load, peft_wrap, cache_hit))
    print(f"| model load + LoRA wrap (s), inilora = cache hit | {hit_s:.3f} | {wrap_s:.3f} | {hit_s / wrap_s:.3f} |")
    print(f"\nbare from_pretrained: {load_s:.3f} s; inilora init on a cache hit adds {hit_s - load_s:.3f} s "
          f"= {100 * (hit_s - load_s) / load_s:.1f} % of the load (plain get_peft_model adds "
          f"{100 * (wrap_s - load_s) / load_s:.1f} %)")


if __name__ == "__main__":
    main()
