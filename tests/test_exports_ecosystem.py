"""Exports that every Hugging Face loader takes, from any working directory, and training-time adapters that cannot
be mistaken for plain PEFT adapters.

Reloads run in a fresh process that never imports inilora_hf, started in a directory other than the exports'
parent, and compare logits with the trained model's (the in-memory PEFT model the exports were written from).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    Trainer,
    TrainingArguments,
)

from inilora_hf import BaseModelNotFoundError, convert, inilora_init, load_trained
from inilora_hf.cli.app import main
from inilora_hf.training.init_metadata import INIT_METADATA_NAME, TRAINING_ADAPTER_INIT
from tests import helpers
from tests.conftest import TINY_LLAMA, tiny_llama

# fp32 logits of order 1 through two decoder layers: the exports sum the same products in another order (a rank-2r
# adapter, or merged weights), which moves each logit by some ulps per layer (~1e-7 each); 1e-4 leaves a wide margin
# for that and still catches any real error (a residual ignored shifts logits by > 1e-2).
TOLERANCE = 1e-4
INPUT_IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def relative_exports(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A residual-variant run whose base was given as a relative path ("base"), exported to relative folders, then
    reloaded with the auto classes from another working directory."""
    root = tmp_path_factory.mktemp("relative")
    (root / "project").mkdir()
    (root / "elsewhere").mkdir()
    tiny_llama().save_pretrained(root / "project" / "base")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root / "project")
        model = inilora_init("base", variant="pissa", rank=4, lora_alpha=8, cache_dir="cache")()
        helpers.train_a_few_steps(model)
        logits = helpers.logits_of(model, INPUT_IDS)
        convert.to_merged(model, "merged")
        convert.to_lora(model, "lora")
    project = root / "project"
    reloaded = helpers.reload_exports_without_inilora(
        project / "base", project / "merged", project / "lora", INPUT_IDS, logits, root, cwd=root / "elsewhere"
    )
    return {"project": project, "model": model, "reloaded": reloaded}


def test_standard_lora_records_the_task_type_and_the_base_as_an_absolute_path(relative_exports: dict) -> None:
    project = relative_exports["project"]
    saved = read_json(project / "lora" / "adapter_config.json")
    assert saved["task_type"] == "CAUSAL_LM"
    assert saved["base_model_name_or_path"] == str(project / "base")  # given as "base"
    card = (project / "lora" / "README.md").read_text()
    assert f"the local directory `{project / 'base'}`, recorded in `adapter_config.json` as this absolute path" in card
    assert "AutoPeftModelForCausalLM.from_pretrained" in card


def test_exports_load_with_auto_classes_from_another_directory(relative_exports: dict) -> None:
    reloaded = relative_exports["reloaded"]
    assert reloaded["inilora_hf_imported"] is False
    assert reloaded["auto_lora_class"] == "PeftModelForCausalLM"
    assert reloaded["auto_lora"] <= TOLERANCE
    assert reloaded["merged"] <= TOLERANCE
    assert reloaded["lora"] <= TOLERANCE


def test_merged_checkpoint_keeps_the_base_inference_config(tiny_base_dir: Path, token_dataset, tmp_path: Path) -> None:
    args = TrainingArguments(
        str(tmp_path / "run"),
        max_steps=1,
        per_device_train_batch_size=4,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=inilora_init(tiny_base_dir, variant="milora", rank=4)(), args=args, train_dataset=token_dataset
    )
    trainer.train()
    assert trainer.model.config.use_cache is False  # Trainer's training-time switch (args.use_cache)
    convert.to_merged(trainer.model, tmp_path / "merged")
    base_config = read_json(tiny_base_dir / "config.json")
    assert base_config["use_cache"] is True
    assert read_json(tmp_path / "merged" / "config.json")["use_cache"] == base_config["use_cache"]
    assert trainer.model.config.use_cache is False  # the trained model itself is left alone


def test_sequence_classification_exports_load_with_their_auto_classes(tmp_path: Path) -> None:
    """Without a task type in the LoRA config, the adapter gets SEQ_CLS from the model class, and the (frozen)
    classification head that PEFT's SEQ_CLS loader requires."""
    torch.manual_seed(0)
    LlamaForSequenceClassification(LlamaConfig(**TINY_LLAMA, num_labels=3, pad_token_id=0)).save_pretrained(
        tmp_path / "base"
    )
    init = inilora_init(
        tmp_path / "base", variant="inilora-alpha", rank=4, model_class=AutoModelForSequenceClassification
    )
    model = init()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=INPUT_IDS, labels=torch.tensor([0, 2])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    logits = helpers.logits_of(model, INPUT_IDS)
    convert.to_merged(model, tmp_path / "merged")
    convert.to_lora(model, tmp_path / "lora")
    assert read_json(tmp_path / "lora" / "adapter_config.json")["task_type"] == "SEQ_CLS"
    (tmp_path / "elsewhere").mkdir()
    reloaded = helpers.reload_exports_without_inilora(
        tmp_path / "base",
        tmp_path / "merged",
        tmp_path / "lora",
        INPUT_IDS,
        logits,
        tmp_path,
        cwd=tmp_path / "elsewhere",
        auto_classes=("AutoModelForSequenceClassification", "AutoPeftModelForSequenceClassification"),
    )
    assert reloaded["auto_lora_class"] == "PeftModelForSequenceClassification"
    assert max(reloaded["auto_lora"], reloaded["lora"], reloaded["merged"]) <= TOLERANCE


def test_exports_record_the_base_actually_loaded_not_the_factor_sets(
    tiny_base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    factor_set = inilora_init(tiny_base_dir, variant="pissa", rank=4).prepare()
    factor_set.save_pretrained(tmp_path / "factors")
    shutil.copytree(tiny_base_dir, tmp_path / "copy")  # same weights, another place
    monkeypatch.chdir(tmp_path)
    model = inilora_init("copy", factors="factors")()
    assert model.factor_set.base_model == str(tiny_base_dir)
    convert.to_lora(model, "lora")
    model.save_pretrained("adapter")
    assert read_json(tmp_path / "lora" / "adapter_config.json")["base_model_name_or_path"] == str(tmp_path / "copy")
    assert read_json(tmp_path / "adapter" / INIT_METADATA_NAME)["base_model"] == str(tmp_path / "copy")


def test_hub_base_is_recorded_as_its_hub_id_and_loads_from_anywhere(hub, tiny_base_dir: Path, tmp_path: Path) -> None:
    hub.api.create_repo("tester/tiny-base")
    hub.api.upload_folder(repo_id="tester/tiny-base", folder_path=tiny_base_dir)
    model = inilora_init("tester/tiny-base", variant="inilora-alpha", rank=4)()
    helpers.train_a_few_steps(model)
    logits = helpers.logits_of(model, INPUT_IDS)
    convert.to_merged(model, tmp_path / "merged")
    convert.to_lora(model, tmp_path / "lora")
    assert read_json(tmp_path / "lora" / "adapter_config.json")["base_model_name_or_path"] == "tester/tiny-base"
    card = (tmp_path / "lora" / "README.md").read_text()
    assert "base_model: tester/tiny-base" in card and "the Hub model `tester/tiny-base`" in card
    (tmp_path / "elsewhere").mkdir()
    reloaded = helpers.reload_exports_without_inilora(  # the subprocess inherits HF_ENDPOINT / HF_HOME
        "tester/tiny-base",
        tmp_path / "merged",
        tmp_path / "lora",
        INPUT_IDS,
        logits,
        tmp_path,
        cwd=tmp_path / "elsewhere",
    )
    assert max(reloaded["auto_lora"], reloaded["lora"], reloaded["merged"]) <= TOLERANCE


@pytest.fixture(scope="module")
def trained_run(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A residual-variant Trainer run: checkpoint-2 and `save_model()` output."""
    from datasets import Dataset

    out = tmp_path_factory.mktemp("trained")
    ids = torch.randint(4, 128, (16, 12), generator=torch.Generator().manual_seed(0)).tolist()
    dataset = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(
        str(out / "run"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model_init=inilora_init(tiny_base_dir, variant="pissa", rank=4), args=args, train_dataset=dataset)
    trainer.train()
    trainer.save_model(str(out / "final"))
    return {
        "checkpoint": out / "run" / "checkpoint-2",
        "final": out / "final",
        "logits": helpers.logits_of(trainer.model.eval(), INPUT_IDS),
    }


@pytest.mark.parametrize("folder", ["checkpoint", "final"])
def test_training_adapter_card_says_what_it_is_and_the_two_ways_out(trained_run: dict, folder: str) -> None:
    card = (trained_run[folder] / "README.md").read_text()
    assert "# inilora_hf training adapter (`pissa` LoRA init): not a standalone PEFT adapter" in card
    assert "**Do not load it with `PeftModel.from_pretrained` on the original base model.**" in card
    assert "**residual base**" in card and "`R = W0 − s·B0·A0`" in card
    assert 'model = load_trained("path/to/this/folder")' in card
    assert "inilora-hf convert path/to/this/folder --merged merged --lora lora" in card
    assert 'AutoPeftModelForCausalLM.from_pretrained("lora")' in card
    assert "Model Card for Model ID" not in card  # PEFT's stock card is gone
    assert read_json(trained_run[folder] / "adapter_config.json")["init_lora_weights"] == TRAINING_ADAPTER_INIT


@pytest.mark.parametrize("folder", ["checkpoint", "final"])
def test_training_adapter_refuses_plain_peft_and_load_trained_matches(
    trained_run: dict, tiny_base_dir: Path, folder: str
) -> None:
    with pytest.raises(ValueError, match=r"init_lora_weights='inilora_hf: .*inilora_hf\.load_trained\(dir\)"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_dir), trained_run[folder])
    reloaded = helpers.logits_of(load_trained(trained_run[folder]), INPUT_IDS)
    assert (reloaded - trained_run["logits"]).abs().max() <= TOLERANCE


def test_training_adapter_of_a_non_residual_variant_stays_a_plain_peft_adapter(
    tiny_base_dir: Path, tmp_path: Path
) -> None:
    model = inilora_init(tiny_base_dir, variant="gaussian", rank=4)()
    helpers.train_a_few_steps(model)
    model.save_pretrained(tmp_path / "adapter")
    assert read_json(tmp_path / "adapter" / "adapter_config.json")["init_lora_weights"] is True
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "this is a standard PEFT adapter for the original base" in card and "library_name: peft" in card
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_dir), tmp_path / "adapter")
    expected = helpers.logits_of(model, INPUT_IDS)
    assert (helpers.logits_of(plain, INPUT_IDS) - expected).abs().max() <= TOLERANCE


def test_missing_local_base_is_named_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        BaseModelNotFoundError, match=r"No checkpoint directory './no_such_model': .*Hub model id"
    ) as info:
        inilora_init("./no_such_model")
    assert "alphanumeric" not in str(info.value)
    with pytest.raises(BaseModelNotFoundError, match=str(tmp_path / "gone")):
        inilora_init(tmp_path / "gone" / "model")


def test_hub_base_misses_name_the_repo(hub, tmp_path: Path) -> None:
    with pytest.raises(BaseModelNotFoundError, match=r"'tester/missing' is not a local directory and was not found"):
        inilora_init("tester/missing")()
    with (
        hub.offline(),
        pytest.raises(
            BaseModelNotFoundError,
            match=r"'tester/missing' .*not in the local Hugging Face cache .*hf download tester/missing",
        ),
    ):
        inilora_init("tester/missing")()


def test_moved_base_of_a_checkpoint_is_named(tmp_path: Path, capsys) -> None:
    tiny_llama().save_pretrained(tmp_path / "base")
    inilora_init(tmp_path / "base", variant="pissa", rank=4)().save_pretrained(tmp_path / "adapter")
    (tmp_path / "base").rename(tmp_path / "moved")
    with pytest.raises(BaseModelNotFoundError, match=rf"No checkpoint directory '{tmp_path / 'base'}'.*base_model="):
        load_trained(tmp_path / "adapter")
    capsys.readouterr()
    assert (
        main(
            [
                "convert",
                str(tmp_path / "adapter"),
                "--merged",
                str(tmp_path / "m"),
                "--base-model",
                str(tmp_path / "nowhere"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("inilora-hf convert: error: No checkpoint directory") and err.count("\n") == 1
    assert load_trained(tmp_path / "adapter", base_model=tmp_path / "moved") is not None
