"""Helpers shared by test modules: a few plain training steps, logits, and reloading exports in a process that
never imports inilora_hf."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

RELOAD_SCRIPT = r"""
import json, sys
import peft, torch, transformers
from peft import PeftModel

spec = json.loads(sys.argv[1])
auto_model, auto_peft_model = getattr(transformers, spec["auto_model"]), getattr(peft, spec["auto_peft_model"])
ids = torch.tensor(spec["input_ids"])
reference = torch.load(spec["logits"])
with torch.no_grad():
    merged = auto_model.from_pretrained(spec["merged"])
    lora = PeftModel.from_pretrained(auto_model.from_pretrained(spec["base"]), spec["lora"])
    auto_lora = auto_peft_model.from_pretrained(spec["lora"])  # the base recorded in adapter_config.json
    result = {"merged": (merged(input_ids=ids).logits - reference).abs().max().item(),
              "lora": (lora(input_ids=ids).logits - reference).abs().max().item(),
              "auto_lora": (auto_lora(input_ids=ids).logits - reference).abs().max().item(),
              "auto_lora_class": type(auto_lora).__name__,
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


def reload_exports_without_inilora(
    base: Path | str,
    merged: Path,
    lora: Path,
    input_ids: torch.Tensor,
    logits: torch.Tensor,
    work: Path,
    *,
    cwd: Path | None = None,
    auto_classes: tuple[str, str] = ("AutoModelForCausalLM", "AutoPeftModelForCausalLM"),
) -> dict:
    """Load `merged` with plain transformers, `lora` with plain peft on `base` (a directory or Hub id) and `lora`
    alone with the `auto_classes[1]` class of peft, in a fresh process started in `cwd`; return the max |Δlogits|
    of each against `logits`, the adapter's rank, and whether inilora_hf got imported."""
    torch.save(logits, work / "reference-logits.pt")
    spec = {"base": str(base), "merged": str(merged), "lora": str(lora), "logits": str(work / "reference-logits.pt"),
            "input_ids": input_ids.tolist(), "auto_model": auto_classes[0], "auto_peft_model": auto_classes[1]}
    run = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, json.dumps(spec)], capture_output=True, text=True,
                         timeout=300, cwd=cwd)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
