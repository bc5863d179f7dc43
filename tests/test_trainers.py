"""`inilora_init` as `model_init` for transformers.Trainer and inilora_hf.SFTTrainer, and what training touches."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import number_of_arguments

from inilora_hf import SFTTrainer, inilora_init
from inilora_hf.cli.demo import char_tokenizer, demo_dataset
from tests.conftest import tiny_llama
from tests.helpers import sft_args


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def test_two_steps_move_only_lora_parameters() -> None:
    model = inilora_init(tiny_llama(), variant="inilora-beta")()
    before = snapshot(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = snapshot(model)
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved, "LoRA parameters should have moved"
    assert all(".lora_A." in name or ".lora_B." in name for name in moved)
    base_weights = [n for n in before if "base_layer.weight" in n]
    assert len(base_weights) == 4 and all(torch.equal(before[n], after[n]) for n in base_weights)


def test_transformers_trainer_with_model_init(tmp_path, tiny_base_dir, token_dataset) -> None:
    init = inilora_init(tiny_base_dir, variant="pissa", rank=4)
    assert number_of_arguments(init) == 1  # Trainer passes the HP-search trial
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model_init=init, args=args, train_dataset=token_dataset)
    result = trainer.train()
    assert result.global_step == 3
    assert trainer.model.factor_set is init.factor_set
    assert init.factor_source == "computed"  # computed once in __init__, reused in memory by train()'s re-init
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_model_init_accepts_a_trial_and_returns_fresh_models(tiny_base_dir) -> None:
    init = inilora_init(tiny_base_dir, variant="inilora-alpha")
    first, second = init(), init({"learning_rate": 1e-3})
    assert first is not second
    a = first.get_base_model().model.layers[0].self_attn.q_proj
    b = second.get_base_model().model.layers[0].self_attn.q_proj
    assert torch.equal(a.lora_A["default"].weight, b.lora_A["default"].weight)
    assert torch.equal(a.base_layer.weight, b.base_layer.weight)


@pytest.fixture(scope="module")
def demo_base(tmp_path_factory):
    from inilora_hf.cli.demo import build_demo_base

    return build_demo_base(tmp_path_factory.mktemp("demo-base"))


def test_sft_trainer_with_model_init_trains_and_reinitialises(tmp_path, demo_base) -> None:
    from transformers import AutoTokenizer

    calls = []
    init = inilora_init(demo_base, variant="inilora", steps=100)

    def counting_init(trial=None):
        calls.append(trial)
        return init(trial)

    trainer = SFTTrainer(
        model_init=counting_init,
        args=sft_args(tmp_path / "sft"),
        train_dataset=demo_dataset(),
        processing_class=AutoTokenizer.from_pretrained(demo_base),
    )
    first = trainer.train()
    assert first.global_step == 2 and len(calls) == 1  # the model built in __init__ is reused
    second = trainer.train()
    assert second.global_step == 2 and len(calls) == 2  # a second train() re-initialises through model_init
    assert trainer.model.init_report.variant == "inilora"


def test_trl_sft_trainer_accepts_an_initialised_model(tmp_path, demo_base) -> None:
    import trl
    from transformers import AutoTokenizer

    model = inilora_init(demo_base, variant="milora")()
    trainer = trl.SFTTrainer(
        model=model,
        args=sft_args(tmp_path / "sft"),
        train_dataset=demo_dataset(),
        processing_class=AutoTokenizer.from_pretrained(demo_base),
    )
    assert trainer.train().global_step == 2


def test_sft_trainer_rejects_model_init_with_peft_config(tmp_path, demo_base) -> None:
    with pytest.raises(ValueError, match="peft_config"):
        SFTTrainer(
            model_init=inilora_init(demo_base, variant="lora"),
            args=sft_args(tmp_path / "sft"),
            train_dataset=demo_dataset(),
            processing_class=char_tokenizer(["ab"]),
            peft_config=LoraConfig(r=4),
        )
    with pytest.raises(ValueError, match="not both"):
        SFTTrainer(model=tiny_llama(), model_init=inilora_init(demo_base), args=sft_args(tmp_path / "sft"))
