"""Helpers shared by test modules: a few plain training steps, logits, fp32 rounding bounds, and reloading exports
in a process that never imports inilora_hf."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

RELOAD_SCRIPT = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel

spec = json.loads(sys.argv[1])
ids = torch.tensor(spec["input_ids"])
reference = torch.load(spec["logits"])
with torch.no_grad():
    merged = AutoModelForCausalLM.from_pretrained(spec["merged"])
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(spec["base"]), spec["lora"])
    result = {"merged": (merged(input_ids=ids).logits - reference).abs().max().item(),
              "lora": (lora(input_ids=ids).logits - reference).abs().max().item(),
              "r": lora.peft_config["default"].r,
              "inilora_hf_imported": "inilora_hf" in sys.modules}
print(json.dumps(result))
"""


def train_a_few_steps(model: torch.nn.Module, steps: int = 2, lr: float = 1e-2) -> None:
    """Plain Adam steps on a fixed batch: large enough that every trainable tensor moves visibly."""
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def logits_of(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits without gradients."""
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


FP32_UNIT_ROUNDOFF = 2.0**-24  # u: round-to-nearest fp32 gives |fl(x) − x| ≤ u·|x|


def fp32_gamma(n: int) -> float:
    """Higham's γ_n = n·u / (1 − n·u): the relative error bound of n chained fp32 roundings, e.g. of a length-n dot
    product against Σ|x_i·y_i|."""
    return n * FP32_UNIT_ROUNDOFF / (1 - n * FP32_UNIT_ROUNDOFF)


def llama_forward_roundings(config: Any, seq_len: int, lora_rank: int = 0) -> int:
    """fp32 roundings along the longest dependency chain of one Llama forward pass to a logit.

    Per decoder layer: two RMSNorms (a sum over `hidden_size`, then 4 elementwise steps), the q/k/v and gate/up
    contractions over `hidden_size`, the scores over `head_dim`, softmax and attention·V over the sequence, o_proj
    over heads·`head_dim`, down over `intermediate_size`; a LoRA branch adds `r + 2` to each projection
    (x·Aᵀ, then ·Bᵀ, then the sum); 12 elementwise steps (RoPE, score scale, exp, max, SiLU, gate product, the two
    residual adds). Then the final RMSNorm and lm_head over `hidden_size`.
    """
    hidden, head_dim = config.hidden_size, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    branch = lora_rank + 2 if lora_rank else 0
    norm = hidden + 4
    per_layer = (
        2 * norm + (hidden + branch) + (head_dim + 1) + 2 * seq_len + (config.num_attention_heads * head_dim + branch)
        + (hidden + branch) + (config.intermediate_size + branch) + 12
    )
    return config.num_hidden_layers * per_layer + norm + hidden


def fp32_logits_tolerance(reference: Any, input_ids: torch.Tensor, lora_rank: int = 0) -> float:
    """The largest |Δlogits| two fp32 forwards of the same math may show when they order their operations differently
    (a merged weight vs base + LoRA branch, another BLAS blocking): 2·γ_n·max_j Σ_i |h_i|·|W_ji|, with `n` from
    `llama_forward_roundings`, `h` the reference's final normalised hidden state and `W` its lm_head. That sum is the
    scale of Higham's dot-product bound for the logits; earlier rounding reaches them as a relative error of `h`
    (RMSNorm is scale-invariant), so it is counted in `n` at the same scale; 2: each forward may be off by that much.

    Example:
        >>> tolerance = fp32_logits_tolerance(plain_fp32_model, input_ids, lora_rank=8)   # doctest: +SKIP
    """
    with torch.no_grad():
        hidden = reference.base_model(input_ids=input_ids).last_hidden_state.float()
        scale = (hidden.abs() @ reference.get_output_embeddings().weight.float().abs().T).max().item()
    roundings = llama_forward_roundings(reference.config, input_ids.shape[-1], lora_rank)
    return 2 * fp32_gamma(roundings) * scale


def reload_exports_without_inilora(
    base: Path, merged: Path, lora: Path, input_ids: torch.Tensor, logits: torch.Tensor, work: Path
) -> dict:
    """Load `merged` with plain transformers and `lora` with plain peft on `base` in a fresh process; return the
    max |Δlogits| of each against `logits`, the adapter's rank, and whether inilora_hf got imported."""
    torch.save(logits, work / "reference-logits.pt")
    spec = {"base": str(base), "merged": str(merged), "lora": str(lora),
            "logits": str(work / "reference-logits.pt"), "input_ids": input_ids.tolist()}
    run = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, json.dumps(spec)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
