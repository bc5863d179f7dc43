"""DeepSpeed ZeRO-3 on 2 CPU processes (`DS_ACCELERATOR=cpu`, gloo, torchrun): `Trainer(model_init=inilora_init(...),
args=TrainingArguments(deepspeed=ZeRO-3))` partitions the base as it loads; the init reads the gathered W0 and
writes the residual into the partitions, so the model at init is the base model; one Trainer step equals the same
SGD step in one process within fp32 reduction-order rounding, and so do the exports `ExportCallback` gathers at
the checkpoint; what `trainer.save_model` saves reloads with `load_trained` and exports to the same checkpoint, and
resuming from a checkpoint takes the same next step.
What ZeRO-3 cannot run (quantized bases, data-driven variants, an already partitioned loaded model) is refused with
`UnsupportedShardingError`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from accelerate.utils.deepspeed import HfDeepSpeedConfig as AccelerateDeepSpeedConfig
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import BitsAndBytesConfig
from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

from inilora_hf import inilora_init, load_trained
from inilora_hf.convert import to_merged
from inilora_hf.errors import UnsupportedShardingError
from tests.dist_zero3_worker import LEARNING_RATE, RANK, batch
from tests.helpers import REPO_ROOT, fp32_gamma, sgd_step_tolerance, sgd_step_with_magnitudes, torchrun, torchrun_env

WORKER = str(REPO_ROOT / "tests" / "dist_zero3_worker.py")


def _close(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> bool:
    return bool(((actual.double() - expected).abs() <= bound).all())


def test_deepspeed_zero3_trains_and_exports_like_one_process(tiny_base_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    env = {**torchrun_env(tmp_path), "DS_ACCELERATOR": "cpu"}
    result = torchrun(WORKER, str(tiny_base_dir), str(out), str(tmp_path / "cache"), env=env)
    assert result.returncode == 0, result.stdout[-6000:]
    ranks = [json.loads((out / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert [(r["rank"], r["world_size"], r["partitioned"]) for r in ranks] == [(0, 2, True), (1, 2, True)]
    for kind in ("merged_init", "merged", "lora"):
        assert [r[kind] for r in ranks] == [str(out / kind.replace("_", "-"))] * 2, "every rank returns the export"
    assert all("already DeepSpeed ZeRO-3 partitioned" in r["partitioned_model_refused"] for r in ranks)
    assert all("no ZeRO-3 config is active any more" in r["export_without_config_refused"] for r in ranks)
    assert not (out / "merged-late").exists()

    base = load_file(tiny_base_dir / "model.safetensors")  # W0, as saved
    reference = inilora_init(tiny_base_dir, variant="pissa", rank=RANK, use_cache=False)()
    layers = {n.removeprefix("base_model.model."): m for n, m in reference.named_modules() if isinstance(m, LoraLayer)}
    initial = {
        name: (layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double())
        for name, layer in layers.items()
    }

    # At init the model is the base model: R + s·B0·A0 = W0 up to the rounding of R = fl(W0 − s·B0·A0) and of the
    # merge fl(R + s·B0·A0), r products summed and scaled in each.
    merged_init = load_file(out / "merged-init" / "model.safetensors")
    assert merged_init.keys() == base.keys()
    for key, weight in base.items():
        name = key.removesuffix(".weight")
        if name not in layers:
            assert torch.equal(merged_init[key], weight), key
            continue
        A0, B0 = initial[name]
        low_rank = layers[name].scaling["default"] * B0.abs() @ A0.abs()
        bound = fp32_gamma(RANK + 2) * (2 * weight.double().abs() + 3 * low_rank)
        assert _close(merged_init[key], weight.double(), bound), key

    # One Trainer step (2 rows per rank, gradients averaged by ZeRO-3) against the same SGD step in one process.
    magnitudes, tokens = sgd_step_with_magnitudes(reference, batch(), LEARNING_RATE)
    stepped = dict(reference.named_parameters())
    checkpoint = out / "run" / "checkpoint-1"
    saved_step = load_file(checkpoint / "adapter_model.safetensors")  # the Trainer's own ZeRO-3 gather
    exported = load_file(checkpoint / "export" / "lora" / "adapter_model.safetensors")  # ExportCallback's gather
    tolerances: dict[str, torch.Tensor] = {}
    for key, magnitude in magnitudes.items():
        tolerances[key] = sgd_step_tolerance(LEARNING_RATE, tokens, magnitude, stepped[key])
        plain = key.replace(".default.weight", ".weight")
        assert _close(saved_step[plain], stepped[key].detach().double(), tolerances[key]), plain
        own = exported[plain][:RANK] if ".lora_A." in key else exported[plain][:, :RANK]
        assert torch.equal(own, saved_step[plain]), plain
    # to_lora's second half: the init factors, bit-identical to one process's (both compute pissa's SVD on one
    # thread: the suite's `single_torch_thread`, the worker's `set_num_threads(1)`).
    for name, (A0, B0) in initial.items():
        assert torch.equal(exported[f"base_model.model.{name}.lora_A.weight"][RANK:].double(), A0), name
        assert torch.equal(exported[f"base_model.model.{name}.lora_B.weight"][:, RANK:].double(), -B0), name

    # The merged export at that checkpoint: W0 + s·(B1·A1 − B0·A0), up to the rounding of R and of the merge, and
    # the step's own tolerance on A1 and B1 carried through s·B1·A1.
    merged_step = load_file(checkpoint / "export" / "merged" / "model.safetensors")
    for name, layer in layers.items():
        key, scaling = f"base_model.model.{name}", layer.scaling["default"]
        A1, B1 = (stepped[f"{key}.lora_{part}.default.weight"].detach().double() for part in "AB")
        dA, dB = tolerances[f"{key}.lora_A.default.weight"], tolerances[f"{key}.lora_B.default.weight"]
        A0, B0 = initial[name]
        weight = base[f"{name}.weight"].double()
        exact = weight + scaling * (B1 @ A1 - B0 @ A0)
        rounding = fp32_gamma(RANK + 2) * (
            2 * (weight.abs() + scaling * B0.abs() @ A0.abs()) + scaling * B1.abs() @ A1.abs()
        )
        carried = scaling * (dB @ A1.abs() + B1.abs() @ dA + dB @ dA)
        assert _close(merged_step[f"{name}.weight"], exact, rounding + carried), name
    # The checkpoint itself (adapter + init metadata, as the Trainer saved it under ZeRO-3) exports the same.
    from_checkpoint = load_file(to_merged(checkpoint, tmp_path / "merged-1") / "model.safetensors")
    assert from_checkpoint.keys() == merged_step.keys()
    assert all(torch.equal(from_checkpoint[k], merged_step[k]) for k in merged_step)

    # Two steps were taken; `trainer.save_model` and the exports after them agree, and reload with `load_trained`.
    final = load_file(out / "run" / "checkpoint-2" / "adapter_model.safetensors")
    assert any(not torch.equal(final[k], saved_step[k]) for k in final), "the second step changed the adapter"
    saved = load_file(out / "saved" / "adapter_model.safetensors")
    assert saved.keys() == final.keys() and all(torch.equal(saved[k], final[k]) for k in final)
    merged = load_file(out / "merged" / "model.safetensors")
    by_callback = load_file(out / "run" / "export" / "merged" / "model.safetensors")
    assert by_callback.keys() == merged.keys() and all(torch.equal(by_callback[k], merged[k]) for k in merged)
    lora = load_file(out / "lora" / "adapter_model.safetensors")
    for key, value in final.items():
        assert torch.equal(lora[key][:RANK] if ".lora_A." in key else lora[key][:, :RANK], value), key
    reloaded = load_trained(out / "saved")
    again = load_file(to_merged(reloaded, tmp_path / "merged-again") / "model.safetensors")
    assert again.keys() == merged.keys() and all(torch.equal(again[k], merged[k]) for k in merged)

    # Resuming from checkpoint-1 (a second run: DeepSpeed's partitions and optimizer state) takes the same step 2.
    result = torchrun(WORKER, str(tiny_base_dir), str(out), str(tmp_path / "cache"), "resume", env=env)
    assert result.returncode == 0, result.stdout[-6000:]
    resumed = load_file(out / "resumed" / "checkpoint-2" / "adapter_model.safetensors")
    assert resumed.keys() == final.keys() and all(torch.equal(resumed[k], final[k]) for k in final)


@pytest.fixture
def zero3_config() -> Iterator[None]:
    """transformers' own ZeRO-3 flag, as the Trainer's `TrainingArguments(deepspeed=...)` and `HfDeepSpeedConfig`
    set it (here with accelerate's config class, which needs no process group)."""
    zero3 = AccelerateDeepSpeedConfig({"zero_optimization": {"stage": 3}})
    set_hf_deepspeed_config(zero3)  # a weak reference: `zero3` keeps it alive
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def test_deepspeed_zero3_refuses_a_quantized_base(tiny_base_dir: Path, zero3_config: None) -> None:
    with pytest.raises(UnsupportedShardingError, match="cannot partition a bitsandbytes-quantized base"):
        inilora_init(tiny_base_dir, variant="pissa", quantization_config=BitsAndBytesConfig(load_in_4bit=True))


def test_deepspeed_zero3_refuses_a_data_driven_variant_to_compute(tiny_base_dir: Path, zero3_config: None) -> None:
    with pytest.raises(UnsupportedShardingError, match="Data-driven variants run a calibration pass"):
        inilora_init(tiny_base_dir, variant="lora-sb", use_cache=False)
