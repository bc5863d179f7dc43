"""Quantized-init fidelity per variant and refinement: ‖deq(Q(R)) + s·B·A − W0‖/‖W0‖ vs plain QLoRA.

    python benchmarks/quantized_fidelity.py [--model DIR] [--bits 4|8]

Prints a markdown table; the model defaults to the demo's tiny Llama built from a config.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import BitsAndBytesConfig

from inilora_hf import inilora_init
from inilora_hf.cli.demo import build_demo_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8))
    args = parser.parse_args()
    model = args.model or str(build_demo_base(tempfile.mkdtemp()))
    config = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        if args.bits == 4
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    print("| variant | refine_steps | init error ‖Q(R)+sBA−W0‖/‖W0‖ | plain QLoRA ‖Q(W0)−W0‖/‖W0‖ | ratio |")
    print("|---|---|---|---|---|")
    for variant in ("inilora", "inilora-alpha", "inilora-beta", "pissa", "milora"):
        for refine_steps in (0, 1, 5):
            init = inilora_init(
                model, variant=variant, quantization_config=config, refine_steps=refine_steps, use_cache=False
            )
            rows = init().init_report.modules
            error = sum(r.quantized_init_error for r in rows) / len(rows)
            qlora = sum(r.qlora_error for r in rows) / len(rows)
            print(f"| {variant} | {refine_steps} | {error:.4f} | {qlora:.4f} | {error / qlora:.2f} |")


if __name__ == "__main__":
    main()
