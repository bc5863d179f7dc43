"""FSDP2 on 2 CPU processes (gloo): every rank builds the same residual model, one SGD step on sharded
parameters equals the same step in one process, and `to_merged` / `to_lora` of the sharded model gather the full
tensors and write the same exports as torch's own full-state gather gives; what `Trainer.save_model` saves under
FSDP2 reloads with `load_trained` to the same weights. DeepSpeed ZeRO-3: tests/test_deepspeed.py."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from inilora_hf import inilora_init, load_trained
from inilora_hf.convert import to_merged
from tests.dist_fsdp_worker import FIT_STEPS, LEARNING_RATE, batch
from tests.helpers import REPO_ROOT, fp32_gamma, sgd_step_tolerance, sgd_step_with_magnitudes, torchrun, torchrun_env

WORKER = str(REPO_ROOT / "tests" / "dist_fsdp_worker.py")


def _one_process_step(base: Path) -> tuple[torch.nn.Module, dict[str, torch.Tensor], int]:
    """The same init and SGD step in this process on the whole batch, with `sgd_step_with_magnitudes`."""
    model = inilora_init(base, variant="inilora", steps=FIT_STEPS, use_cache=False)()
    magnitudes, tokens = sgd_step_with_magnitudes(model, batch(), LEARNING_RATE)
    return model, magnitudes, tokens


def test_fsdp_trains_and_exports_like_one_process(tiny_base_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result = torchrun(WORKER, str(tiny_base_dir), str(out), str(tmp_path / "cache"), env=torchrun_env(tmp_path))
    assert result.returncode == 0, result.stdout[-6000:]
    ranks = [json.loads((out / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["init"] == ranks[1]["init"], "every rank builds the same residual model"
    assert [r["merged"] for r in ranks] == [str(out / "merged")] * 2, "every rank returns the written export"
    assert [r["lora"] for r in ranks] == [str(out / "lora")] * 2
    gathered = torch.load(out / "full_state.pt")  # torch's own gather of the shards

    reference, magnitudes, tokens = _one_process_step(tiny_base_dir)
    expected = dict(reference.named_parameters())
    worst = 0.0
    for key, magnitude in magnitudes.items():
        tolerance = sgd_step_tolerance(LEARNING_RATE, tokens, magnitude, expected[key])
        difference = (gathered[key].double() - expected[key].detach().double()).abs()
        assert (difference <= tolerance).all(), f"{key}: {difference.max():.3g}"
        worst = max(worst, difference.max().item())
    print(f"max |FSDP − one process| over the LoRA weights after one step: {worst:.3g}")

    merged = load_file(out / "merged" / "model.safetensors")
    by_callback = load_file(out / "run" / "export" / "merged" / "model.safetensors")
    assert by_callback.keys() == merged.keys() and all(torch.equal(by_callback[k], merged[k]) for k in merged)
    assert (out / "run" / "export" / "lora" / "adapter_model.safetensors").is_file()
    # What Trainer.save_model writes under FSDP2 reloads as the trained model, and exports to the same checkpoint.
    reloaded = load_trained(out / "saved")
    for key, parameter in reloaded.named_parameters():
        if "lora_" in key or key.endswith("base_layer.weight"):
            assert torch.equal(parameter.detach(), gathered[key]), key
    again = load_file(to_merged(reloaded, tmp_path / "merged-again") / "model.safetensors")
    assert again.keys() == merged.keys() and all(torch.equal(again[k], merged[k]) for k in merged)
    adapter = load_file(out / "lora" / "adapter_model.safetensors")
    for name, layer in reference.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        plain = name.removeprefix("base_model.model.")
        scaling = layer.scaling["default"]
        lora_A = gathered[f"{name}.lora_A.default.weight"].double()
        lora_B = gathered[f"{name}.lora_B.default.weight"].double()
        residual = gathered[f"{name}.base_layer.weight"].double()
        exact = residual + scaling * lora_B @ lora_A
        # fp32 evaluation of R + s·B·A: r products summed, the scaling, the addition.
        rank = lora_A.shape[0]
        rounding = fp32_gamma(rank + 2) * (residual.abs() + scaling * lora_B.abs() @ lora_A.abs())
        assert ((merged[f"{plain}.weight"].double() - exact).abs() <= rounding).all(), plain
        key = f"base_model.model.{plain}"
        assert torch.equal(adapter[f"{key}.lora_A.weight"][:rank], gathered[f"{name}.lora_A.default.weight"]), plain
        assert torch.equal(adapter[f"{key}.lora_B.weight"][:, :rank], gathered[f"{name}.lora_B.default.weight"]), plain
