"""Checkpoints of residual-variant runs: init metadata everywhere, exact resume and reload in a new process,
standard exports from `ExportCallback`, the init report in the trainer logs, and clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerControl, TrainerState, TrainingArguments

from inilora_hf import FactorSet, FactorSetMismatchError, inilora_init
from inilora_hf.trainer_callbacks import ExportCallback, InitReportCallback, run_dir
from inilora_hf.training.init_metadata import INIT_FACTORS_DIR, INIT_METADATA_NAME
from inilora_hf.training.trained_model import load_trained
from tests import helpers
from tests.helpers import fp32_logits_tolerance, lora_state
from tests.test_convert import INPUT_IDS, logits_of, make_tiny_base

REPO = Path(__file__).resolve().parents[1]


def make_trainer(base_dir: Path, cache_dir: Path, output_dir: Path, callbacks: list) -> Trainer:
    """The run under test: inilora (residual) init via model_init, fp32 on CPU, 4 steps, a checkpoint every 2."""
    init = inilora_init(str(base_dir), variant="inilora", rank=4, lora_alpha=8, cache_dir=cache_dir, steps=50)
    return helpers.make_trainer(init, output_dir, callbacks)


def losses(log_history: list[dict]) -> list[tuple[int, float]]:
    return [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]


NEW_PROCESS_SCRIPT = r"""
import json, shutil, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
spec = json.loads(sys.argv[2])
import torch
from transformers import AutoModelForCausalLM
from inilora_hf import convert
from inilora_hf.training.trained_model import load_trained
from inilora_hf.trainer_callbacks import ExportCallback
from tests.test_resume import make_trainer, lora_state, losses
from tests.test_convert import logits_of

first, second = Path(spec["first"]), Path(spec["second"])
reference = torch.load(first / "logits.pt")
result = {}
# Resume from a copy of checkpoint-2 (with its exports and metadata) for the 2 remaining steps.
shutil.copytree(first / "checkpoint-2", second / "checkpoint-2")
trainer = make_trainer(Path(spec["base"]), Path(spec["cache"]), second, [ExportCallback()])
trainer.train(resume_from_checkpoint=str(second / "checkpoint-2"))
torch.save(lora_state(trainer.model), second / "resumed_lora.pt")
result["losses"] = losses(trainer.state.log_history)
result["adapters"] = sorted(trainer.model.peft_config)
# Rebuild the trained model from files alone.
for name in ("checkpoint-4", "final"):
    result[f"load_trained/{name}"] = (logits_of(load_trained(first / name)) - reference).abs().max().item()
convert.to_merged(str(first / "checkpoint-4"), second / "merged-from-checkpoint")
merged = AutoModelForCausalLM.from_pretrained(second / "merged-from-checkpoint")
result["to_merged(checkpoint)"] = (logits_of(merged) - reference).abs().max().item()
exported = AutoModelForCausalLM.from_pretrained(first / "export" / "merged")
result["export/merged"] = (logits_of(exported) - reference).abs().max().item()
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """4 steps straight (in this process), then resume + reload checks in one new process."""
    root = tmp_path_factory.mktemp("resume")
    base_dir, cache_dir, first = make_tiny_base(root / "base"), root / "cache", root / "first"
    trainer = make_trainer(base_dir, cache_dir, first, [ExportCallback()])
    trainer.add_callback(InitReportCallback(trainer))
    trainer.train()
    trainer.save_model(str(first / "final"))
    trainer.model.eval()
    torch.save(logits_of(trainer.model), first / "logits.pt")
    spec = {"base": str(base_dir), "cache": str(cache_dir), "first": str(first), "second": str(root / "second")}
    started = time.perf_counter()
    process = subprocess.run(
        [sys.executable, "-c", NEW_PROCESS_SCRIPT, str(REPO), json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    return {
        "root": root,
        "base": base_dir,
        "first": first,
        "second": root / "second",
        "trainer": trainer,
        "logits": torch.load(first / "logits.pt"),
        "new_process": json.loads(process.stdout.strip().splitlines()[-1]),
        # Merged weights or a rebuilt R reorder the fp32 arithmetic: the derived fp32 bound for these logits.
        "tolerance": fp32_logits_tolerance(trainer.model.get_base_model(), INPUT_IDS, 4),
        "subprocess_seconds": time.perf_counter() - started,
    }


def test_resume_in_new_process_matches_straight_run(run: dict) -> None:
    straight = lora_state(run["trainer"].model)
    resumed = torch.load(run["second"] / "resumed_lora.pt")
    assert sorted(resumed) == sorted(straight)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert run["new_process"]["losses"] == [list(x) for x in losses(run["trainer"].state.log_history)]
    assert [step for step, _ in run["new_process"]["losses"]] == [1, 2, 3, 4]
    # `export/` keeps the exported adapter out of Trainer's "extra adapter subfolder" scan on resume.
    assert run["new_process"]["adapters"] == ["default"]


@pytest.mark.parametrize(
    "key", ["load_trained/checkpoint-4", "load_trained/final", "to_merged(checkpoint)", "export/merged"]
)
def test_files_alone_give_trained_logits_in_new_process(run: dict, key: str) -> None:
    assert run["new_process"][key] <= run["tolerance"]


@pytest.mark.parametrize("folder", ["checkpoint-2", "checkpoint-4", "final"])
def test_init_metadata_in_every_checkpoint_and_save_model_output(run: dict, folder: str) -> None:
    directory = run["first"] / folder
    metadata = json.loads((directory / INIT_METADATA_NAME).read_text())
    init = run["trainer"].model_init
    assert metadata["variant"] == "inilora" and metadata["residual"] is True
    assert metadata["config_hash"] == init.factor_set.config.config_hash()
    assert metadata["model_key"] == init.factor_set.model_key
    assert metadata["cache_key"].startswith("inilora-r4-") and metadata["base_model"] == str(run["base"])
    assert metadata["factor_source"] in ("computed", f"cache:{metadata['cache_key']}")
    stored = FactorSet.from_pretrained(directory / INIT_FACTORS_DIR)
    assert not stored.has_residual
    trained = run["trainer"].model.get_base_model()
    for name, factors in init.factor_set.factors.items():
        assert torch.equal(stored.factors[name].lora_A, factors.lora_A)  # A0, not the trained A
        assert not torch.equal(stored.factors[name].lora_A, trained.get_submodule(name).lora_A["default"].weight)


@pytest.mark.parametrize("folder", ["checkpoint-2", "checkpoint-4", "."])
def test_export_callback_writes_standard_checkpoints(run: dict, folder: str) -> None:
    export = run["first"] / folder / "export"
    assert {"model.safetensors", "config.json"} <= {p.name for p in (export / "merged").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} == {
        p.name for p in (export / "lora").iterdir()
    }
    assert json.loads((export / "lora" / "adapter_config.json").read_text())["r"] == 8  # 2r: residual variant


def test_checkpoint_exports_hold_that_checkpoint(run: dict) -> None:
    early = (run["first"] / "checkpoint-2" / "export" / "lora" / "adapter_model.safetensors").read_bytes()
    late = (run["first"] / "checkpoint-4" / "export" / "lora" / "adapter_model.safetensors").read_bytes()
    assert early != late


def test_init_report_reaches_log_history(run: dict) -> None:
    entries = [e for e in run["trainer"].state.log_history if "init/max_reconstruction_error" in e]
    assert len(entries) == 1 and entries[0]["step"] == 0
    assert entries[0]["init/max_reconstruction_error"] < 1e-5
    assert entries[0]["init/residual"] == 1.0 and entries[0]["init/mean_mse_ratio"] >= 1.0


def test_metadata_hook_follows_deepcopy_and_pickle(run: dict, tmp_path: Path) -> None:
    """The save hook is bound per model: a copy saves its own weights (and the metadata), never the original's."""
    import copy
    import pickle

    from safetensors.torch import load_file

    original = run["trainer"].model
    for clone in (copy.deepcopy(original), pickle.loads(pickle.dumps(original))):
        with torch.no_grad():
            for name, parameter in clone.named_parameters():
                if "lora_B" in name:
                    parameter.add_(1.0)
        target = tmp_path / f"clone-{id(clone)}"
        clone.save_pretrained(target)
        saved = load_file(target / "adapter_model.safetensors")
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        assert torch.equal(saved[key], clone.get_base_model().model.layers[0].self_attn.q_proj.lora_B["default"].weight)
        assert (target / INIT_METADATA_NAME).is_file()


def test_init_report_without_trainer_lands_in_log_history(run: dict) -> None:
    state = TrainerState(global_step=0)
    args = TrainingArguments(str(run["root"] / "unused"), report_to=[])
    InitReportCallback().on_train_begin(args, state, TrainerControl(), model=run["trainer"].model)
    assert state.log_history[0]["init/modules"] == 4.0 and state.log_history[0]["step"] == 0
    InitReportCallback().on_train_begin(args, state, TrainerControl(), model=torch.nn.Linear(2, 2))
    assert len(state.log_history) == 1  # no init report, nothing logged


def test_load_trained_without_metadata_asks_for_factors(run: dict, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(run["first"] / "checkpoint-4" / name, bare / name)
    with pytest.raises(ValueError, match=r"factors=") as error:
        load_trained(bare)
    assert INIT_METADATA_NAME in str(error.value)
    model = load_trained(bare, factors=run["first"] / "checkpoint-4" / INIT_FACTORS_DIR)
    assert (logits_of(model) - run["logits"]).abs().max() <= run["tolerance"]
    with pytest.raises(ValueError, match="to_lora"):  # a converted standard adapter is not a residual checkpoint
        load_trained(run["first"] / "export" / "lora", factors=run["trainer"].model_init.factor_set)


def test_load_trained_refuses_a_different_base(run: dict, tmp_path: Path) -> None:
    other = make_tiny_base(tmp_path / "other", seed=1)
    with pytest.raises(FactorSetMismatchError, match="different weights"):
        load_trained(run["first"] / "checkpoint-4", base_model=str(other))
    loaded = AutoModelForCausalLM.from_pretrained(run["base"])
    model = load_trained(run["first"] / "checkpoint-4", base_model=loaded)
    assert (logits_of(model) - run["logits"]).abs().max() <= run["tolerance"]
    assert not any(p.requires_grad for p in model.parameters())


def test_run_dir_follows_hyperparameter_search_trials(tmp_path: Path) -> None:
    args = TrainingArguments(str(tmp_path), report_to=[])
    state = TrainerState(global_step=2)
    assert run_dir(args, state) == tmp_path
    for trial in ("run-0", "run-1"):
        (tmp_path / trial / "checkpoint-2").mkdir(parents=True)
        os.utime(tmp_path / trial / "checkpoint-2", (1, 1 if trial == "run-0" else 2))
    state.trial_params = {"learning_rate": 1e-3}
    assert run_dir(args, state) == tmp_path / "run-1"
    state.trial_name = "named-trial"
    assert run_dir(args, state) == tmp_path / "named-trial"


def test_sft_trainer_checkpoints_carry_metadata_and_exports(tmp_path: Path) -> None:
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig

    from inilora_hf import SFTTrainer

    base_dir = make_tiny_base(tmp_path / "base")
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0", pad_token="w1", eos_token="w2")
    rows = torch.randint(3, 128, (8, 10), generator=torch.Generator().manual_seed(0)).tolist()
    dataset = Dataset.from_dict({"text": [" ".join(f"w{i}" for i in row) for row in rows]})
    init = inilora_init(str(base_dir), variant="pissa", rank=4, cache_dir=tmp_path / "cache")
    config = SFTConfig(
        str(tmp_path / "out"),
        max_steps=2,
        save_steps=1,
        logging_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        use_cpu=True,
        max_length=16,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model_init=init,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[ExportCallback(merged=False, lora=True)],
    )
    trainer.add_callback(InitReportCallback(trainer))
    trainer.train()
    assert [e["step"] for e in trainer.state.log_history if "init/max_reconstruction_error" in e] == [0]
    trainer.save_model(str(tmp_path / "out" / "final"))
    for folder in ("checkpoint-1", "checkpoint-2", "final"):
        directory = tmp_path / "out" / folder
        assert json.loads((directory / INIT_METADATA_NAME).read_text())["variant"] == "pissa"
        assert (directory / INIT_FACTORS_DIR / "factors.safetensors").is_file()
    for folder in ("checkpoint-1", "checkpoint-2", "."):
        assert (tmp_path / "out" / folder / "export" / "lora" / "adapter_model.safetensors").is_file()
        assert not (tmp_path / "out" / folder / "export" / "merged").exists()
    reloaded = load_trained(tmp_path / "out" / "final")
    expected = lora_state(trainer.model)
    assert all(torch.equal(v, lora_state(reloaded)[k]) for k, v in expected.items())


def test_hyperparameter_search_builds_each_trial_from_the_init_and_exports_per_run(tmp_path: Path) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = make_tiny_base(tmp_path / "base")
    trainer = make_trainer(base, tmp_path / "cache", tmp_path / "hp", [ExportCallback(merged=True, lora=False)])
    seen_factor_sets = []
    init = trainer.model_init

    def model_init(trial):
        model = init(trial)
        seen_factor_sets.append(model.factor_set)
        return model

    trainer.model_init = model_init
    trainer.eval_dataset = trainer.train_dataset
    best = trainer.hyperparameter_search(
        direction="minimize",
        backend="optuna",
        n_trials=2,
        hp_space=lambda trial: {"learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-2, log=True)},
    )
    assert best.run_id is not None
    assert len(seen_factor_sets) == 2 and seen_factor_sets[0] is seen_factor_sets[1]  # computed once, reused
    runs = sorted(p.name for p in (tmp_path / "hp").iterdir() if p.name.startswith("run-"))
    assert len(runs) == 2
    for run in runs:
        for checkpoint in ("checkpoint-2", "checkpoint-4"):
            folder = tmp_path / "hp" / run / checkpoint
            assert (folder / INIT_METADATA_NAME).is_file()
            assert (folder / "export" / "merged" / "config.json").is_file()
