"""`inilora_hf.convert`: trained models → merged checkpoints and standard LoRA adapters that plain libraries load.

Every built-in variant is trained for a few optimizer steps, exported both ways, and reloaded in ONE
subprocess that never imports inilora_hf; its logits must equal the trained model's.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from inilora_hf import FactorSet, available_variants, convert, get_variant, inilora_init
from inilora_hf.trainer_callbacks import PushStandardCheckpointCallback
from tests import helpers
from tests.conftest import tiny_llama

TOLERANCE = 1e-4
INPUT_IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
# Data-driven variants (calibration data) are exported in tests/test_lora_sb.py and tests/test_peft_data_inits.py.
VARIANTS = [name for name in available_variants() if not get_variant(name).needs_calibration]
# One extra case: PEFT's `modules_to_save` (a trained copy of lm_head) must survive both exports.
CASES = [*VARIANTS, "pissa+modules_to_save"]


def make_tiny_base(directory: Path, seed: int = 0) -> Path:
    """The tiny Llama used as "original base model" throughout the tests, saved to `directory`."""
    tiny_llama(seed).save_pretrained(directory)
    return directory


def init_for(case: str, base_dir: Path, cache_dir: Path):
    """`inilora_init` for a case: rank 4, alpha 8 (s = 2), rsLoRA on every other variant, q/v/down_proj."""
    variant = case.split("+")[0]
    index = VARIANTS.index(variant)
    options = {"steps": 50} if variant == "inilora" else {}
    extra = {"modules_to_save": ["lm_head"]} if case.endswith("+modules_to_save") else None
    return inilora_init(
        str(base_dir),
        variant=variant,
        rank=4,
        lora_alpha=8,
        use_rslora=bool(index % 2),
        target_modules=["q_proj", "v_proj", "down_proj"],
        cache_dir=cache_dir,
        lora_config_kwargs=extra,
        **options,
    )


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    return helpers.logits_of(model, INPUT_IDS)


RELOAD_SCRIPT = r"""
import json, sys, warnings
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel

spec = json.loads(sys.argv[1])
ids = torch.tensor(spec["input_ids"])
results = {}
for case, folder in spec["cases"].items():
    reference = torch.load(f"{folder}/logits.pt")
    row = {}
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(f"{folder}/merged")
        row["merged"] = (merged(input_ids=ids).logits - reference).abs().max().item()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(spec["base"]), f"{folder}/lora")
        row["lora"] = (lora(input_ids=ids).logits - reference).abs().max().item()
        row["lora_warnings"] = [str(w.message) for w in caught if "peft" in w.filename]
        raw = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(spec["base"]), f"{folder}/raw")
        row["raw"] = (raw(input_ids=ids).logits - reference).abs().max().item()
    results[case] = row
results["inilora_hf_imported"] = "inilora_hf" in sys.modules
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Train every case, export it (merged, standard LoRA, raw PEFT adapter), reload all in one subprocess."""
    root = tmp_path_factory.mktemp("convert")
    base_dir = make_tiny_base(root / "base")
    cases, models, unchanged, factors_kept = {}, {}, {}, {}
    for case in CASES:
        folder = root / case
        model = init_for(case, base_dir, root / "cache")()
        initial = {n: (f.lora_A.clone(), f.lora_B.clone()) for n, f in model.factor_set.factors.items()}
        helpers.train_a_few_steps(model)
        factors_kept[case] = all(
            torch.equal(f.lora_A, initial[n][0]) and torch.equal(f.lora_B, initial[n][1])
            for n, f in model.factor_set.factors.items()
        )
        folder.mkdir()
        torch.save(logits_of(model), folder / "logits.pt")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        convert.to_merged(model, folder / "merged")
        convert.to_lora(model, folder / "lora")
        unchanged[case] = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        type(model).save_pretrained(model, folder / "raw")  # what PEFT alone saves: the bug this module fixes
        cases[case], models[case] = str(folder), model
    spec = {"base": str(base_dir), "cases": cases, "input_ids": INPUT_IDS.tolist()}
    run = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, json.dumps(spec)], capture_output=True, text=True, cwd=root, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    return {
        "root": root,
        "base": base_dir,
        "results": results,
        "models": models,
        "unchanged": unchanged,
        "factors_kept": factors_kept,
        "folders": {k: Path(v) for k, v in cases.items()},
    }


def test_reload_process_never_imported_inilora_hf(exported: dict) -> None:
    assert exported["results"]["inilora_hf_imported"] is False


@pytest.mark.parametrize("case", CASES)
def test_merged_checkpoint_gives_trained_logits(exported: dict, case: str) -> None:
    assert exported["results"][case]["merged"] <= TOLERANCE
    config = json.loads((exported["folders"][case] / "merged" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config


@pytest.mark.parametrize("case", CASES)
def test_standard_lora_on_original_base_gives_trained_logits(exported: dict, case: str) -> None:
    row = exported["results"][case]
    assert row["lora"] <= TOLERANCE
    assert row["lora_warnings"] == []
    model = exported["models"][case]
    factor_set = model.factor_set
    saved = json.loads((exported["folders"][case] / "lora" / "adapter_config.json").read_text())
    residual = get_variant(factor_set.config.variant).residual
    assert saved["r"] == (2 if residual else 1) * factor_set.config.rank
    rank_factor = math.sqrt(saved["r"]) if saved["use_rslora"] else saved["r"]
    assert saved["lora_alpha"] / rank_factor == pytest.approx(factor_set.config.scaling, rel=1e-12)
    assert saved["init_lora_weights"] is True
    assert saved["base_model_name_or_path"] == str(exported["base"])


@pytest.mark.parametrize("case", CASES)
def test_raw_peft_adapter_is_wrong_exactly_for_residual_variants(exported: dict, case: str) -> None:
    """The bug being fixed: PEFT's own save of a residual-variant run silently computes W0 + s·B·A."""
    raw = exported["results"][case]["raw"]
    if get_variant(case.split("+")[0]).residual:
        assert raw > 1e-3
    else:
        assert raw <= TOLERANCE


@pytest.mark.parametrize("case", CASES)
def test_exports_leave_the_trained_model_untouched(exported: dict, case: str) -> None:
    assert exported["unchanged"][case]


@pytest.mark.parametrize("case", CASES)
def test_training_never_writes_into_the_factor_set(exported: dict, case: str) -> None:
    """A0/B0 must stay the initial factors: the LoRA parameters may not share storage with the factor set."""
    assert exported["factors_kept"][case]


def test_residual_adapter_is_stacked_from_trained_and_initial_factors(exported: dict) -> None:
    model = exported["models"]["inilora"]
    name = "model.layers.1.self_attn.v_proj"
    tensors = load_file(exported["folders"]["inilora"] / "lora" / "adapter_model.safetensors")
    layer = model.get_base_model().get_submodule(name)
    initial = model.factor_set.factors[name]
    lora_A, lora_B = (
        tensors[f"base_model.model.{name}.lora_A.weight"],
        tensors[f"base_model.model.{name}.lora_B.weight"],
    )
    assert torch.equal(lora_A, torch.cat([layer.lora_A["default"].weight.detach(), initial.lora_A]))
    assert torch.equal(lora_B, torch.cat([layer.lora_B["default"].weight.detach(), -initial.lora_B], dim=1))
    assert not torch.equal(layer.lora_A["default"].weight.detach(), initial.lora_A)  # training moved A


def test_merged_weights_are_computed_in_fp32_and_cast_once(exported: dict, tmp_path: Path) -> None:
    model = exported["models"]["pissa"]
    convert.to_merged(model, tmp_path / "bf16", dtype="bfloat16")
    tensors = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    name = "model.layers.0.mlp.down_proj"
    layer = model.get_base_model().get_submodule(name)
    expected = layer.get_base_layer().weight.float() + layer.scaling["default"] * (
        layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()
    )
    assert torch.equal(tensors[f"{name}.weight"], expected.to(torch.bfloat16))


def test_output_directory_is_written_atomically(
    exported: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = exported["models"]["lora"]
    target = tmp_path / "lora"
    convert.to_lora(model, target)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        convert.to_lora(model, target)
    first = target.joinpath("adapter_model.safetensors").read_bytes()

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("inilora_hf.convert.export.save_torch_state_dict", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        convert.to_lora(model, target, overwrite=True)
    assert target.joinpath("adapter_model.safetensors").read_bytes() == first  # old export intact
    with pytest.raises(RuntimeError, match="disk full"):
        convert.to_lora(model, tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]  # no half-written or temporary folder
    monkeypatch.undo()
    convert.to_lora(model, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_conversion_errors_name_the_problem(exported: dict, tmp_path: Path) -> None:
    plain = get_peft_model(
        AutoModelForCausalLM.from_pretrained(exported["base"]), LoraConfig(r=2, target_modules=["q_proj"])
    )
    with pytest.raises(ValueError, match="factor_set"):
        convert.to_lora(plain, tmp_path / "a")
    with pytest.raises(TypeError, match="PeftModel"):
        convert.to_merged(plain.get_base_model(), tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        convert.to_merged(tmp_path, tmp_path / "c")


def test_push_standard_checkpoints_with_model_cards(
    exported: dict, hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = exported["models"]["inilora"]
    model.factor_set.push_to_hub("tester/tiny-factors")
    monkeypatch.setattr(model, "factor_set", FactorSet.from_pretrained("tester/tiny-factors"))  # as if pulled
    args = TrainingArguments(
        str(tmp_path / "run"), push_to_hub=True, hub_model_id="tester/tiny-inilora", hub_token=hub.token, report_to=[]
    )
    callback = PushStandardCheckpointCallback()
    callback.on_train_end(args, TrainerState(), TrainerControl(), model=model, processing_class=None)
    assert callback.pushed == {"merged": "tester/tiny-inilora-merged", "lora": "tester/tiny-inilora-lora"}
    merged = hub.store.repo("tester/tiny-inilora-merged").files()
    lora = hub.store.repo("tester/tiny-inilora-lora").files()
    assert {"model.safetensors", "config.json", "README.md"} <= set(merged)
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(lora)
    merged_card, lora_card = merged["README.md"].decode(), lora["README.md"].decode()
    assert "library_name: transformers" in merged_card and "library_name: peft" in lora_card
    for card in (merged_card, lora_card):
        assert "- inilora" in card and "- lora" in card and "`inilora`" in card
        assert "`tester/tiny-factors` at commit" in card
    assert "base_model" not in merged_card  # a local base path is no valid Hub base_model reference
    (tmp_path / "pulled").mkdir()
    for name, data in merged.items():
        (tmp_path / "pulled" / name).write_bytes(data)
    pulled = AutoModelForCausalLM.from_pretrained(tmp_path / "pulled")
    assert (logits_of(pulled) - logits_of(model)).abs().max() <= TOLERANCE


def test_push_also_shares_a_locally_computed_factor_set(exported: dict, hub, tmp_path: Path) -> None:
    model = copy.deepcopy(exported["models"]["pissa"])
    assert "source_repo" not in model.factor_set.info
    args = TrainingArguments(
        str(tmp_path / "run"), push_to_hub=True, hub_model_id="tester/tiny-pissa", hub_token=hub.token, report_to=[]
    )
    callback = PushStandardCheckpointCallback(merged=False)
    callback.on_train_end(args, TrainerState(), TrainerControl(), model=model, processing_class=None)
    assert callback.pushed == {"factors": "tester/tiny-pissa-factors", "lora": "tester/tiny-pissa-lora"}
    pulled = FactorSet.from_pretrained("tester/tiny-pissa-factors")
    for name, module in model.factor_set.factors.items():
        assert torch.equal(pulled.factors[name].lora_A, module.lora_A)
    lora_card = hub.store.repo("tester/tiny-pissa-lora").files()["README.md"].decode()
    assert "`tester/tiny-pissa-factors` at commit" in lora_card


def test_push_is_skipped_without_push_to_hub(exported: dict, tmp_path: Path) -> None:
    callback = PushStandardCheckpointCallback()
    args = TrainingArguments(str(tmp_path / "run"), report_to=[])
    callback.on_train_end(args, TrainerState(), TrainerControl(), model=exported["models"]["lora"])
    assert callback.pushed == {}
