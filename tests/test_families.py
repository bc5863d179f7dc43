"""The architecture matrix: every family of `tests/families.py`, from a tiny random config, end to end.

Per family: `pissa` (a residual variant) with the default targets and with `"all-linear"` starts at the base
model's outputs; `lora-sb` starts at `W0 + trunc_r(−η·sign(G))` with the gradient taken by plain autograd; two
`transformers.Trainer` steps; `to_merged` and `to_lora` reload in a process that never imports inilora_hf (one
worker for the whole module) with the trained outputs and the right `task_type`. Mixture-of-experts weights are
refused with a named error. The README's family table is the one `tests/families.py` renders.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from transformers import Trainer, TrainingArguments
from transformers.pytorch_utils import Conv1D

from inilora_hf import convert, inilora_init
from inilora_hf.errors import TargetModuleError
from inilora_hf.training.calibration.data import calibration_set
from tests import helpers
from tests.families import BATCH, FAMILIES, Family, render_table

RANK, ALPHA = 4, 8
ETA = 1e-2  # large enough that W0 + trunc_r(−η·sign(G)) visibly moves the outputs
#: The design's fp32 invariant for outputs that must be equal: max |Δ| within 1e-5 of max |reference|.
TOLERANCE = 1e-5
README = Path(__file__).resolve().parent.parent / "README.md"

RELOAD_WORKER = r"""
import json, sys
import peft, torch, transformers
from peft import PeftModel

for line in sys.stdin:
    spec = json.loads(line)
    auto = getattr(transformers, spec["auto_class"])
    inputs, reference = torch.load(spec["inputs"]), torch.load(spec["logits"])
    with torch.no_grad():
        merged = auto.from_pretrained(spec["merged"]).eval()
        lora = PeftModel.from_pretrained(auto.from_pretrained(spec["base"]).eval(), spec["lora"]).eval()
        config = lora.peft_config["default"]
        result = {
            "merged": (merged(**inputs).logits - reference).abs().max().item(),
            "lora": (lora(**inputs).logits - reference).abs().max().item(),
            "task_type": config.task_type,
            "fan_in_fan_out": config.fan_in_fan_out,
            "inilora_hf_imported": "inilora_hf" in sys.modules,
        }
    print("RESULT " + json.dumps(result), flush=True)
"""


class ReloadWorker:
    """One plain-Python process (never imports inilora_hf) that reloads exports on request."""

    def __init__(self, log: Path) -> None:
        self._log = log.open("w")
        self._process = subprocess.Popen(
            [sys.executable, "-c", RELOAD_WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )

    def reload(self, spec: dict[str, Any]) -> dict[str, Any]:
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(json.dumps(spec) + "\n")
        self._process.stdin.flush()
        for line in self._process.stdout:
            if line.startswith("RESULT "):
                return json.loads(line.removeprefix("RESULT "))
        raise AssertionError(f"the reload worker died: {Path(self._log.name).read_text()[-3000:]}")

    def close(self) -> None:
        self._process.kill()  # idle, waiting for the next request: nothing to finish
        self._process.wait(timeout=60)
        self._log.close()


@pytest.fixture(scope="module")
def reloader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReloadWorker]:
    worker = ReloadWorker(tmp_path_factory.mktemp("reload") / "worker.log")
    yield worker
    worker.close()


def logits_of(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


def relative_difference(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output - reference).abs().max() / reference.abs().max())


def independent_first_step(family: Family, base_dir: Path, batch: dict, names: list[str]) -> dict[str, np.ndarray]:
    """−η·sign(∇_W loss / n) as `(out, in)`, by plain autograd on a fresh copy of the base (zero dropout)."""
    model = family.model_class().from_pretrained(base_dir).train()
    (model(**batch).loss / next(iter(batch.values())).shape[0]).backward()
    steps = {}
    for name in names:
        module = model.get_submodule(name)
        gradient = module.weight.grad.double().numpy()
        steps[name] = -ETA * np.sign(gradient.T if isinstance(module, Conv1D) else gradient)
    return steps


def train_two_steps(family: Family, init: Any, output_dir: Path) -> torch.nn.Module:
    """Two `transformers.Trainer` steps (batch 2) from `init`; returns the trained model."""
    batch = family.inputs(seed=3, labels=True, batch=4)
    rows = [{key: value[i] for key, value in batch.items()} for i in range(4)]
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model_init=init, args=args, train_dataset=rows)
    trainer.train()
    return trainer.model.eval()


def export_and_reload(
    family: Family, trained: torch.nn.Module, inputs: dict, tmp_path: Path, reloader: ReloadWorker
) -> dict[str, Any]:
    """`to_merged` and `to_lora` of `trained` (on the base in `tmp_path / "base"`), reloaded by the worker: the max
    |Δlogits| of each against `trained`'s own logits, and the adapter's `task_type` and `fan_in_fan_out`."""
    convert.to_merged(trained, tmp_path / "merged")
    convert.to_lora(trained, tmp_path / "lora")
    torch.save(inputs, tmp_path / "inputs.pt")
    torch.save(logits_of(trained, inputs), tmp_path / "logits.pt")
    return reloader.reload(
        {
            "auto_class": family.auto_class,
            "base": str(tmp_path / "base"),
            "merged": str(tmp_path / "merged"),
            "lora": str(tmp_path / "lora"),
            "inputs": str(tmp_path / "inputs.pt"),
            "logits": str(tmp_path / "logits.pt"),
        }
    )


@pytest.mark.parametrize("family", FAMILIES, ids=[family.model_type for family in FAMILIES])
def test_family_initialises_trains_and_exports(family: Family, tmp_path: Path, reloader: ReloadWorker) -> None:
    torch.manual_seed(0)
    base = family.model_class()(family.tiny_config()).eval()
    base.save_pretrained(tmp_path / "base")
    inputs = family.inputs(seed=1)
    base_logits = logits_of(base, inputs)
    common = {"rank": RANK, "lora_alpha": ALPHA, "model_class": getattr(transformers, family.auto_class)}

    # A residual variant with the default targets (PEFT's own for the model type) starts at the base's outputs.
    init = inilora_init(tmp_path / "base", variant=family.residual_variant, target_modules=family.targets, **common)
    model = init()
    expected = family.targets or family.default_targets()
    assert sorted({name.rsplit(".", 1)[-1] for name in init.prepare().factors}) == sorted(expected)
    assert relative_difference(logits_of(model.eval(), inputs), base_logits) <= TOLERANCE
    everything = inilora_init(tmp_path / "base", variant=family.residual_variant, target_modules="all-linear", **common)
    assert len(everything.prepare().factors) > len(init.prepare().factors)
    assert relative_difference(logits_of(everything().eval(), inputs), base_logits) <= TOLERANCE

    # LoRA-SB: W0 untouched, s·B·R·A the best rank-r approximation of the first step −η·sign(G).
    batch = family.inputs(seed=2, labels=True)
    sketch = inilora_init(
        tmp_path / "base", variant="lora-sb", target_modules=family.targets, eta=ETA, calibration_data=[batch], **common
    )
    factor_set = sketch.prepare()
    steps = independent_first_step(family, tmp_path / "base", batch, sorted(factor_set.factors))
    for name, step in steps.items():
        factors = factor_set.factors[name]
        product = factors.lora_B.double().numpy() @ factors.extra["lora_core"].double().numpy()
        product = factor_set.config.scaling_for(name) * product @ factors.lora_A.double().numpy()
        U, S, Vt = (t.numpy() for t in torch.linalg.svd(torch.from_numpy(step), full_matrices=False))  # float64
        best = (U[:, :RANK] * S[:RANK]) @ Vt[:RANK]
        error = helpers.svd_backward_error(S, step.shape)
        # sign(G) can have rank < r (a gradient of rank 1, e.g. from one decoder token): then the rank-r truncation is
        # the step itself, and the product, an fp32 SVD's, is within 2E of it (E per SVD, spectral norm).
        exact = len(S) > RANK and S[RANK] <= error
        tolerance = 2 * error + S[RANK] if exact else helpers.truncated_svd_tolerance(S, step.shape, RANK)
        assert np.abs(product - best).max() <= tolerance, name
    started = sketch().eval()
    with started.disable_adapter():
        assert relative_difference(logits_of(started, inputs), base_logits) <= TOLERANCE
    assert relative_difference(logits_of(started, inputs), base_logits) > 100 * TOLERANCE

    # Two Trainer steps, then both exports reload without inilora_hf and give the trained outputs.
    trained = train_two_steps(family, init, tmp_path / "run")
    trained_logits = logits_of(trained, inputs)
    assert relative_difference(trained_logits, base_logits) > 100 * TOLERANCE, "training must move the outputs"
    result = export_and_reload(family, trained, inputs, tmp_path, reloader)
    scale = float(trained_logits.abs().max())
    assert result["merged"] <= TOLERANCE * scale and result["lora"] <= TOLERANCE * scale, result
    assert result["task_type"] == family.task_type
    assert result["fan_in_fan_out"] is any(isinstance(m, Conv1D) for m in base.modules())
    assert result["inilora_hf_imported"] is False


def test_lora_sb_exports_on_conv1d_layers_reload_without_inilora(tmp_path: Path, reloader: ReloadWorker) -> None:
    # The LoRA-XS core on fan_in_fan_out layers: `to_merged` folds s·B·R·A into the in × out weight, `to_lora` saves
    # B·R as a plain rank-r B (W0 is untouched).
    gpt2 = next(family for family in FAMILIES if family.model_type == "gpt2")
    torch.manual_seed(0)
    gpt2.model_class()(gpt2.tiny_config()).save_pretrained(tmp_path / "base")
    batch = gpt2.inputs(seed=2, labels=True)
    init = inilora_init(
        tmp_path / "base",
        variant="lora-sb",
        rank=RANK,
        lora_alpha=ALPHA,
        target_modules="all-linear",
        eta=ETA,
        calibration_data=[batch],
    )
    trained = train_two_steps(gpt2, init, tmp_path / "run")
    inputs = gpt2.inputs(seed=1)
    started = logits_of(init().eval(), inputs)
    trained_logits = logits_of(trained, inputs)
    assert relative_difference(trained_logits, started) > 100 * TOLERANCE, "training must move the outputs"
    result = export_and_reload(gpt2, trained, inputs, tmp_path, reloader)
    scale = float(trained_logits.abs().max())
    assert result["merged"] <= TOLERANCE * scale and result["lora"] <= TOLERANCE * scale, result
    assert result["fan_in_fan_out"] is True and result["inilora_hf_imported"] is False


def test_moe_expert_weights_are_refused_with_what_to_target(tmp_path: Path) -> None:
    mixtral = next(family for family in FAMILIES if family.model_type == "mixtral")
    torch.manual_seed(0)
    model = mixtral.model_class()(mixtral.tiny_config())
    with pytest.raises(TargetModuleError, match=r"3-D expert weights.*target_parameters.*attention projections"):
        inilora_init(model, variant="pissa", rank=RANK, target_modules=["experts"]).prepare()
    with pytest.raises(TargetModuleError, match=r"target_parameters=.*'all-linear', which leaves the experts out"):
        inilora_init(model, variant="pissa", rank=RANK, lora_config_kwargs={"target_parameters": ["experts.down_proj"]})


def test_image_and_audio_calibration_rows_ask_for_batches() -> None:
    # Batches of pixel_values / input_features are taken (the matrix's ViT and Whisper); single rows have no collator.
    vit = next(family for family in FAMILIES if family.model_type == "vit")
    batch = vit.inputs(seed=0, labels=True)
    assert calibration_set([batch]).samples == BATCH
    with pytest.raises(ValueError, match=r"rows with `pixel_values` need batching: pass a DataLoader"):
        calibration_set([{key: value[0] for key, value in batch.items()}])


def test_readme_family_table_is_the_rendered_matrix() -> None:
    assert render_table() in README.read_text(), (
        "README's model-family table is stale: paste `python -m tests.families`"
    )
