"""Quantized-init fidelity per variant and refinement: ‖deq(Q(R)) + s·B·A − W0‖/‖W0‖ vs plain QLoRA.

    python -m benchmarks.quantized_fidelity [--threads 1] [--model DIR] [--bits 4|8]

Prints a markdown table; the model defaults to the demo's tiny Llama built from a config. It measures errors,
not time, so nothing is repeated; the thread count is still pinned (``--threads``, default 1) and printed: the
order of floating-point sums, and with it the last digits of a result, can depend on it.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import BitsAndBytesConfig
from transformers.utils import logging as hf_logging

from benchmarks.harness import add_run_arguments, markdown_table, pin_threads, run_header
from inilora_hf import inilora_init
from inilora_hf.cli.demo import build_demo_base

VARIANTS = ("inilora", "inilora-alpha", "inilora-beta", "pissa", "milora")
REFINE_STEPS = (0, 1, 5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8))
    add_run_arguments(parser, repeats=None)
    args = parser.parse_args(argv)
    pin_threads(args.threads)
    hf_logging.disable_progress_bar()  # also silences inilora_hf's bars (see inilora_hf.log)
    print(f"{args.bits}-bit; {run_header(None)}\n")
    with tempfile.TemporaryDirectory(prefix="quantized-fidelity-") as tmp:
        rows = _rows(args.model or str(build_demo_base(tmp)), args.bits)
    print(
        markdown_table(
            ["variant", "refine_steps", "init error ‖Q(R)+sBA−W0‖/‖W0‖", "plain QLoRA ‖Q(W0)−W0‖/‖W0‖", "ratio"],
            rows,
            numeric=[False, True, True, True, True],
        )
    )


def _rows(model: str, bits: int) -> list[list[str]]:
    """One row per variant and refinement: mean init error over the target modules, plain QLoRA's, ratio."""
    config = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        if bits == 4
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    rows = []
    for variant in VARIANTS:
        for refine_steps in REFINE_STEPS:
            init = inilora_init(
                model, variant=variant, quantization_config=config, refine_steps=refine_steps, use_cache=False
            )
            modules = init().init_report.modules
            error = sum(m.quantized_init_error for m in modules) / len(modules)
            qlora = sum(m.qlora_error for m in modules) / len(modules)
            rows.append([variant, str(refine_steps), f"{error:.4f}", f"{qlora:.4f}", f"{error / qlora:.2f}"])
    return rows


if __name__ == "__main__":
    main()
