"""LoRA-SB: calibration plumbing, the factors against an independent computation, LoRA-XS training, conversion,
and `SFTTrainer(model_init=...)` using its own train dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from inilora_hf import SFTTrainer, convert, inilora_init, load_trained
from inilora_hf.adapters.loraxs import count_core_parameters
from inilora_hf.training.calibration import (
    calibration_set,
    estimate_gradients,
    first_step_learning_rate,
    input_covariances,
    pad_collate,
)
from tests import helpers

RANK, ALPHA, ETA = 4, 8, 1e-3  # scaling s = 2
TARGETS = ["q_proj", "v_proj", "down_proj"]
SAMPLES, BATCH = 10, 4  # batches of 4, 4 and 2 samples
TOLERANCE = 1e-4
INPUT_IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """24 equal-length token rows, no labels (the default collator uses the inputs as labels)."""
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(4, 128, (12,), generator=generator).tolist()} for _ in range(24)]


def lora_sb_init(base, rows, cache_dir, **overrides):
    kwargs = dict(
        variant="lora-sb",
        rank=RANK,
        lora_alpha=ALPHA,
        target_modules=TARGETS,
        eta=ETA,
        calibration_data=rows,
        calibration_samples=SAMPLES,
        calibration_batch_size=BATCH,
        cache_dir=cache_dir,
    )
    return inilora_init(base, **{**kwargs, **overrides})


def independent_first_step(base_dir: Path, rows: list[dict]) -> dict[str, np.ndarray]:
    """−η·sign(Σ_b ∇_W loss_b / n_b), with plain autograd on a fresh model (gradients accumulate across backward)."""
    model = AutoModelForCausalLM.from_pretrained(base_dir).train()
    for start in range(0, SAMPLES, BATCH):
        ids = torch.tensor([row["input_ids"] for row in rows[start : min(start + BATCH, SAMPLES)]])
        (model(input_ids=ids, labels=ids).loss / len(ids)).backward()
    return {
        name: -ETA * np.sign(module.weight.grad.double().numpy())
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in TARGETS
    }


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    return helpers.logits_of(model, INPUT_IDS)


# ------------------------------------------------------------------------------------------------- factors


def test_factors_are_orthonormal_and_the_best_rank_r_first_step(tiny_base_dir: Path, rows, tmp_path: Path) -> None:
    factor_set = lora_sb_init(tiny_base_dir, rows, tmp_path).prepare()
    expected = independent_first_step(tiny_base_dir, rows)
    assert sorted(factor_set.factors) == sorted(expected) and len(expected) == 6
    eye = np.eye(RANK)
    for name, update in expected.items():
        factors = factor_set.factors[name]
        B, A = factors.lora_B.double().numpy(), factors.lora_A.double().numpy()
        core = factors.extra["lora_core"].double().numpy()
        # fp32 singular vectors are orthonormal to γ_max(m,n); storing them in fp32 adds 2u.
        orthonormal = helpers.fp32_gamma(max(update.shape) + 2)
        assert np.abs(B.T @ B - eye).max() <= orthonormal and np.abs(A @ A.T - eye).max() <= orthonormal, name
        U, S, Vt = np.linalg.svd(update, full_matrices=False)
        best = (U[:, :RANK] * S[:RANK]) @ Vt[:RANK]
        scaling = ALPHA / RANK
        assert np.abs(scaling * B @ core @ A - best).max() <= helpers.truncated_svd_tolerance(S, update.shape, RANK), (
            name
        )
        # R = Σ_r / s, each fp32 singular value within the backward error E of the exact one (Weyl).
        assert np.allclose(
            core, np.diag(S[:RANK]) / scaling, rtol=0, atol=helpers.svd_backward_error(S, update.shape) / scaling
        ), name
    assert factor_set.config.options["eta"] == ETA
    assert factor_set.config.options["calibration"]["samples"] == SAMPLES


def test_calibration_sees_exactly_n_samples_and_restores_the_model(tiny_base_dir: Path, rows) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir).eval()
    model.model.embed_tokens.weight.requires_grad_(False)  # an unusual flag that must survive
    seen: list[int] = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: t.clone() for n, t in model.state_dict().items()}

    loader = DataLoader(Dataset.from_list(rows), batch_size=BATCH, collate_fn=pad_collate)
    from_loader = calibration_set(loader, samples=SAMPLES)
    from_rows = calibration_set(rows, samples=SAMPLES, batch_size=BATCH)
    assert [len(b["input_ids"]) for b in from_loader.batches] == [4, 4, 2]  # last batch truncated
    assert from_loader.sample_counts == from_rows.sample_counts == [4, 4, 2]
    assert from_loader.sha256 == from_rows.sha256  # same samples, same batches: same identity
    assert calibration_set(rows, samples=SAMPLES + 1, batch_size=BATCH).sha256 != from_rows.sha256

    names = [n for n, m in model.named_modules() if n.endswith("q_proj")]
    gradients = estimate_gradients(model, from_loader.batches, names)
    assert sum(seen) == SAMPLES and seen == [4, 4, 2]
    assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in gradients.values())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())

    with pytest.raises(ValueError, match="holds only 24 samples"):
        calibration_set(rows, samples=25)


def test_cache_key_covers_the_calibration_samples(tiny_base_dir: Path, rows, tmp_path: Path) -> None:
    counted: list[int] = []
    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    base.register_forward_pre_hook(
        lambda module, args, kwargs: counted.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    first = lora_sb_init(base, rows, tmp_path)
    first.prepare()
    assert first.factor_source == "computed" and sum(counted) == SAMPLES
    second = lora_sb_init(base, rows, tmp_path)
    second.prepare()
    assert second.factor_source.startswith("cache:") and sum(counted) == SAMPLES  # no second gradient pass
    other = lora_sb_init(base, rows[1:], tmp_path)
    other.prepare()
    assert other.factor_source == "computed" and sum(counted) == 2 * SAMPLES
    assert other.config.config_hash() != first.config.config_hash()


def test_missing_data_or_eta_is_explained(tiny_base_dir: Path, rows, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="calibration_data="):
        lora_sb_init(tiny_base_dir, None, tmp_path).prepare()
    with pytest.raises(ValueError, match="eta="):
        lora_sb_init(tiny_base_dir, rows, tmp_path, eta=None).prepare()
    with pytest.raises(ValueError, match="no effect with variant 'pissa'"):
        inilora_init(tiny_base_dir, variant="pissa", calibration_data=rows)


# ------------------------------------------------------------------------------------- training and export


def test_only_cores_train_and_exports_reproduce_the_trained_model(tiny_base_dir: Path, rows, tmp_path: Path) -> None:
    model = lora_sb_init(tiny_base_dir, rows, tmp_path / "cache")()
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_core." in n for n in trainable) and sum(trainable.values()) == 6 * RANK**2
    assert count_core_parameters(model) == (6, 6 * RANK**2)
    base_logits = logits_of(AutoModelForCausalLM.from_pretrained(tiny_base_dir))
    assert (logits_of(model) - base_logits).abs().max() > 1e-6  # W0 untouched: the init is the first step

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    helpers.train_a_few_steps(model)
    moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert moved == set(trainable)  # every core moved, nothing else (A, B, W0 frozen)
    trained = logits_of(model)

    convert.to_merged(model, tmp_path / "merged")
    convert.to_lora(model, tmp_path / "lora")
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert saved["r"] == RANK and saved["lora_alpha"] == ALPHA and saved["init_lora_weights"] is True
    assert not any("lora_core" in key for key in tensors) and len(tensors) == 12  # plain rank-r: A and B·R

    result = helpers.reload_exports_without_inilora(
        tiny_base_dir, tmp_path / "merged", tmp_path / "lora", INPUT_IDS, trained, tmp_path
    )
    assert result["inilora_hf_imported"] is False
    assert result["merged"] <= TOLERANCE and result["lora"] <= TOLERANCE

    model.save_pretrained(tmp_path / "checkpoint")  # PEFT's own save: A, B and the core
    assert any(
        key.endswith("lora_core.weight") for key in load_file(tmp_path / "checkpoint" / "adapter_model.safetensors")
    )
    reloaded = load_trained(tmp_path / "checkpoint", is_trainable=True)
    assert (logits_of(reloaded) - trained).abs().max() <= 1e-6
    assert all(".lora_core." in n for n, p in reloaded.named_parameters() if p.requires_grad)
    assert (logits_of(reloaded.merge_and_unload()) - trained).abs().max() <= TOLERANCE


# ---------------------------------------------------------------------------------------------- SFTTrainer


@pytest.fixture(scope="module")
def demo_base(tmp_path_factory):
    from inilora_hf.cli.demo import build_demo_base

    return build_demo_base(tmp_path_factory.mktemp("demo-base"))


def test_sft_trainer_uses_its_train_dataset_and_derives_eta(tmp_path: Path, demo_base: Path) -> None:
    from transformers import AutoTokenizer

    from inilora_hf.cli.demo import demo_dataset

    args = helpers.sft_args(tmp_path / "sft", warmup_steps=2)
    init = inilora_init(demo_base, variant="lora-sb", rank=RANK, calibration_samples=12)
    assert init.needs_calibration_data
    trainer = SFTTrainer(
        model_init=init,
        args=args,
        train_dataset=demo_dataset(),
        processing_class=AutoTokenizer.from_pretrained(demo_base),
    )
    # The samples are the trainer's own prepared train rows, batched by its collator and batch size (8 + 4).
    expected = calibration_set(trainer.train_dataset, samples=12, batch_size=8, collate_fn=trainer.data_collator)
    assert init.config.options["calibration"] == {"sha256": expected.sha256, "samples": 12}
    assert init.config.options["eta"] == pytest.approx(5e-3)  # linear warmup of 2 steps: lr at the first step is lr/2
    assert first_step_learning_rate(args, 2) == pytest.approx(5e-3)

    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = trainer.train()
    assert result.global_step == 2
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(np.isfinite(losses))
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)}
    assert moved and all(".lora_core." in n for n in moved)


# ------------------------------------------------------------------------------------ activation statistics


def test_input_covariances_count_real_tokens_only(tiny_base_dir: Path, rows) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    ragged = [{"input_ids": row["input_ids"][: 6 + i % 6]} for i, row in enumerate(rows[:6])]
    batches = calibration_set(ragged, samples=6, batch_size=3).batches
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    stats = input_covariances(model, batches, names)
    assert int(stats["__tokens__"]) == sum(len(r["input_ids"]) for r in ragged) == 51
    assert torch.equal(stats[names[0]], stats[names[1]])  # q and k read the same normalised hidden states
    assert stats[names[2]].shape == (128, 128)
    # Xᵀ·X summed in fp32 over 51 tokens in 2 batches: entrywise within γ_53·(|X|ᵀ·|X|), a perturbation of spectral norm
    # ≤ γ_53·trace, so (Weyl) no eigenvalue drops below −γ_53·trace.
    fp32_floor = -helpers.fp32_gamma(51 + len(batches)) * stats[names[2]].double().diagonal().sum()
    assert torch.linalg.eigvalsh(stats[names[2]].double()).min() >= fp32_floor
