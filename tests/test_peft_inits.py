"""PEFT's own per-layer inits through inilora_hf (`olora`, `orthogonal`, `pissa_niter`, `mica`).

Each is checked against plain PEFT on the same tiny Llama: the same A and B, the same effective weights, the base
model's outputs at init, cache hits that never run PEFT again, MiCA's frozen B and clear option errors. Their exports
are checked with every other variant's in `tests/test_convert.py`.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import Trainer, TrainingArguments

from inilora_hf import InitConfig, available_variants, get_variant, inilora_init, load_trained
from inilora_hf.errors import PeftInitError
from inilora_hf.variants import VariantInputs, peft_native, register_variant, registry
from inilora_hf.variants.peft_native import harvest
from tests import helpers, test_convert
from tests.conftest import tiny_llama

# variant name → PEFT's `init_lora_weights` string for the variant's default options
PEFT_NAMES = {"olora": "olora", "orthogonal": "orthogonal", "pissa_niter": "pissa_niter_4", "mica": "mica"}
RANDOM = {"orthogonal", "pissa_niter"}
RANK, ALPHA = 4, 8
TARGETS = ["q_proj", "v_proj", "down_proj"]
INPUT_IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def use_rslora(variant: str) -> bool:
    """rsLoRA for the residual variants, so that a scaling other than alpha/r reaches PEFT (s = 4, not 2)."""
    return get_variant(variant).residual


def seed_of(seed: int, name: str) -> int:
    """The per-module seed as documented: the first 8 bytes, little-endian, of sha256(f"{seed}/{module name}")."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little")


def peft_config(variant: str, targets: list[str], peft_name: str | None = None) -> LoraConfig:
    return LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        use_rslora=use_rslora(variant),
        target_modules=targets,
        init_lora_weights=peft_name or PEFT_NAMES[variant],  # type: ignore[arg-type]
    )


def through_inilora(base: torch.nn.Module | Path, variant: str, **options):
    """`inilora_init(...)` and its model, on a copy of `base` (a model) or loading `base` (a directory)."""
    init = inilora_init(
        copy.deepcopy(base) if isinstance(base, torch.nn.Module) else str(base),
        variant=variant,
        rank=RANK,
        lora_alpha=ALPHA,
        use_rslora=use_rslora(variant),
        target_modules=TARGETS,
        **options,
    )
    return init, init()


def plain_peft_module(
    base: torch.nn.Module, variant: str, name: str, seed: int = 0, peft_name: str | None = None
) -> torch.nn.Module:
    """Plain PEFT wrapping module `name` alone of a copy of `base`, seeded like inilora_hf seeds that module."""
    model = copy.deepcopy(base)
    if variant in RANDOM:
        torch.manual_seed(seed_of(seed, name))
    return get_peft_model(model, peft_config(variant, [name], peft_name)).get_base_model().get_submodule(name)


def lora_weights(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, base weight) of the default adapter of a PEFT LoRA layer."""
    return (
        layer.lora_A["default"].weight.detach(),
        layer.lora_B["default"].weight.detach(),
        layer.get_base_layer().weight.detach(),
    )


def effective_weight(A: torch.Tensor, B: torch.Tensor, base_weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """W_base + s·B·A, computed in fp64 from the stored fp32 tensors."""
    return base_weight.double() + scaling * (B.double() @ A.double())


@pytest.mark.parametrize("variant", sorted(PEFT_NAMES))
def test_factors_and_effective_weights_equal_plain_peft(variant: str) -> None:
    base = tiny_llama()
    init, model = through_inilora(base, variant)
    names = sorted(init.factor_set.factors)
    assert len(names) == 6
    for name in names:
        A, B, residual = lora_weights(model.get_base_model().get_submodule(name))
        plain_A, plain_B, plain_residual = lora_weights(plain_peft_module(base, variant, name))
        assert torch.equal(A, plain_A) and torch.equal(B, plain_B), name
        assert torch.equal(init.factor_set.factors[name].lora_A, A)
        W0 = base.get_submodule(name).weight.detach()
        scaling = init.factor_set.config.scaling
        # Both residuals are W0 − s·B·A rounded in fp32 (r products, a scaling, a subtraction): each is within
        # γ_{r+2}·(|W0| + s·|B|·|A|) of the exact one.
        bound = 2 * helpers.fp32_gamma(RANK + 2) * (W0.double().abs() + scaling * (B.double().abs() @ A.double().abs()))
        ours, plain = effective_weight(A, B, residual, scaling), effective_weight(A, B, plain_residual, scaling)
        assert bool(((ours - plain).abs() <= bound).all()), name
        assert torch.equal(residual, W0) is not get_variant(variant).residual, name


@pytest.mark.parametrize("variant", ["olora", "mica"])
def test_deterministic_inits_equal_one_plain_peft_call_on_the_whole_model(variant: str) -> None:
    base = tiny_llama()
    init, _ = through_inilora(base, variant)
    plain = get_peft_model(copy.deepcopy(base), peft_config(variant, TARGETS)).get_base_model()
    for name, factors in init.factor_set.factors.items():
        plain_A, plain_B, _ = lora_weights(plain.get_submodule(name))
        assert torch.equal(factors.lora_A, plain_A) and torch.equal(factors.lora_B, plain_B), name


@pytest.mark.parametrize("variant", sorted(PEFT_NAMES))
def test_init_keeps_the_base_models_outputs(variant: str) -> None:
    """Residual variants by R = W0 − s·B·A; orthogonal because B·A = 0 (complementary rows of an orthogonal
    matrix) up to rounding; MiCA because A = 0."""
    base = tiny_llama()
    expected = helpers.logits_of(base, INPUT_IDS)
    _, model = through_inilora(base, variant)
    error = (helpers.logits_of(model, INPUT_IDS) - expected).abs().max().item()
    assert error <= helpers.fp32_logits_tolerance(base, INPUT_IDS, RANK)
    assert model.init_report.residual is get_variant(variant).residual
    assert model.init_report.max_reconstruction_error <= 1e-5


@pytest.mark.parametrize("variant", sorted(PEFT_NAMES))
def test_second_init_is_a_cache_hit_that_never_runs_peft(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tiny_llama()
    first, _ = through_inilora(base, variant)
    assert first.factor_source == "computed"

    def no_peft(*args, **kwargs):
        raise AssertionError("PEFT's init ran on a cache hit")

    monkeypatch.setattr(peft_native, "get_peft_model", no_peft)
    second, model = through_inilora(base, variant)
    assert second.factor_source.startswith("cache:")
    for name, factors in first.factor_set.factors.items():
        A, B, _ = lora_weights(model.get_base_model().get_submodule(name))
        assert torch.equal(A, factors.lora_A) and torch.equal(B, factors.lora_B)


def test_seed_and_niter_are_recorded_and_enter_the_cache_key() -> None:
    base = tiny_llama()
    default, _ = through_inilora(base, "pissa_niter")
    assert default.factor_set.config.options == {"seed": 0, "niter": 4}
    name = "model.layers.0.self_attn.q_proj"
    for options, peft_name in (({"seed": 1}, "pissa_niter_4"), ({"niter": 2}, "pissa_niter_2")):
        other = inilora_init(base, variant="pissa_niter", rank=RANK, lora_alpha=ALPHA, use_rslora=True, **options)
        other.prepare()
        assert other.factor_source == "computed", options
        assert other.factor_set.config.options == {**default.factor_set.config.options, **options}
        plain = plain_peft_module(base, "pissa_niter", name, seed=options.get("seed", 0), peft_name=peft_name)
        plain_A, plain_B, _ = lora_weights(plain)
        factors = other.factor_set.factors[name]
        assert torch.equal(factors.lora_A, plain_A) and torch.equal(factors.lora_B, plain_B), options
        assert not torch.equal(factors.lora_A, default.factor_set.factors[name].lora_A), options
    seeded = {seed: through_inilora(base, "orthogonal", seed=seed)[0].factor_set for seed in (0, 1)}
    assert not torch.equal(seeded[0].factors[name].lora_A, seeded[1].factors[name].lora_A)
    plain_A, _, _ = lora_weights(plain_peft_module(base, "orthogonal", name, seed=1))
    assert torch.equal(seeded[1].factors[name].lora_A, plain_A)


@pytest.mark.parametrize("variant", sorted(RANDOM))
def test_a_module_s_draws_do_not_depend_on_the_other_modules_computed(variant: str) -> None:
    """Streamed computation and `torchrun` ranks compute subsets of the modules: each must get the same factors."""
    base = tiny_llama()
    weights = {n: m.weight.detach().float() for n, m in base.named_modules() if n.endswith(("q_proj", "v_proj"))}
    config = InitConfig(variant, rank=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"])
    compute = get_variant(variant).compute
    together = compute(VariantInputs(weights=weights, config=config))
    for name, weight in weights.items():
        alone = compute(VariantInputs(weights={name: weight}, config=config))[name]
        assert torch.equal(alone.lora_A, together[name].lora_A) and torch.equal(alone.lora_B, together[name].lora_B)


def test_computing_the_factors_leaves_the_caller_s_random_state_alone() -> None:
    init = inilora_init(tiny_llama(), variant="orthogonal", rank=RANK)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    init.prepare()
    assert init.factor_source == "computed"
    assert torch.equal(torch.rand(3), expected)


def test_hyphenated_spelling_is_the_same_variant() -> None:
    assert get_variant("pissa-niter") is get_variant("pissa_niter")
    assert InitConfig("pissa-niter", rank=RANK).variant == "pissa_niter"
    assert "pissa_niter" in available_variants() and "pissa-niter" not in available_variants()
    base = tiny_llama()
    through_inilora(base, "pissa_niter")
    second, _ = through_inilora(base, "pissa-niter")
    assert second.factor_source.startswith("cache:")
    assert second.factor_set.config.variant == "pissa_niter"


def test_alias_collisions_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_ALIASES", dict(registry._ALIASES))
    with pytest.raises(ValueError, match=r"\['pissa-niter'\] already name"):
        register_variant("my-pissa", aliases=("pissa-niter",))(lambda inputs: {})
    with pytest.raises(ValueError, match=r"\['pissa'\] already name"):
        register_variant("my-pissa", aliases=("pissa",))(lambda inputs: {})
    with pytest.raises(ValueError, match="Aliases must be distinct"):
        register_variant("my-pissa", aliases="my_pissa")
    with pytest.raises(ValueError, match="frozen_factors"):
        register_variant("my-pissa", frozen_factors=("lora_C",))


@pytest.mark.parametrize(
    ("variant", "options", "message"),
    [
        ("pissa_niter", {"iters": 4}, r"Unknown option\(s\) \['iters'\] .* Accepted options: niter, seed\."),
        ("pissa_niter", {"niter": -1}, r"`niter` .* non-negative integer, got -1"),
        ("pissa_niter", {"niter": "4"}, r"`niter` .* non-negative integer, got '4'"),
        ("pissa_niter", {"niter": True}, r"`niter` .* non-negative integer, got True"),
        ("orthogonal", {"seed": 0.5}, r"`seed` must be an integer, got 0.5"),
        ("olora", {"seed": 0}, r"Unknown option\(s\) \['seed'\] for variant 'olora'\. Accepted options: none\."),
        ("mica", {"niter": 4}, r"Accepted options: none\."),
    ],
)
def test_options_are_validated(variant: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InitConfig(variant, rank=RANK, options=options)


def test_a_rank_peft_refuses_raises_peft_s_message() -> None:
    with pytest.raises(ValueError, match="Orthogonal initialization requires the LoRA rank to be even, got 3"):
        inilora_init(tiny_llama(), variant="orthogonal", rank=3).prepare()


def test_mica_trains_A_only_exactly_like_plain_peft(tmp_path: Path) -> None:
    base = tiny_llama()
    init, model = through_inilora(base, "mica")
    plain = get_peft_model(copy.deepcopy(base), peft_config("mica", TARGETS))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, p in plain.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name for name in trainable)
    helpers.train_a_few_steps(model)
    helpers.train_a_few_steps(plain)
    for name, factors in init.factor_set.factors.items():
        A, B, _ = lora_weights(model.get_base_model().get_submodule(name))
        plain_A, plain_B, _ = lora_weights(plain.get_base_model().get_submodule(name))
        assert torch.equal(B, factors.lora_B) and torch.equal(plain_B, factors.lora_B), name  # B frozen
        assert not torch.equal(A, factors.lora_A), name  # A trained
        assert torch.equal(A, plain_A), name
    model.save_pretrained(tmp_path / "run")
    reloaded = load_trained(tmp_path / "run", base_model=copy.deepcopy(base), is_trainable=True)
    assert {name for name, p in reloaded.named_parameters() if p.requires_grad} == trainable


def test_mica_b_stays_frozen_through_a_trainer_run_and_its_resume(tmp_path: Path) -> None:
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    init = inilora_init(str(tmp_path / "base"), variant="mica", rank=RANK, lora_alpha=ALPHA, target_modules=TARGETS)
    rows = torch.randint(0, 128, (8, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in rows]

    def trainer(max_steps: int) -> Trainer:
        args = TrainingArguments(
            str(tmp_path / "run"),
            max_steps=max_steps,
            save_steps=1,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )
        return Trainer(model_init=init, args=args, train_dataset=data)

    trainer(1).train()
    resumed = trainer(2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    model = resumed.model
    for name, factors in init.factor_set.factors.items():
        layer = model.get_base_model().get_submodule(name)
        assert not layer.lora_B["default"].weight.requires_grad and layer.lora_A["default"].weight.requires_grad
        A, B, _ = lora_weights(layer)
        assert torch.equal(B, factors.lora_B) and not torch.equal(A, factors.lora_A), name


def test_a_peft_init_that_differs_from_the_declaration_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a PEFT release that changed an init would look like: the checks name the variant and what differs."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    declared = {
        "olora-not-residual": ("olora", {"residual": False}, "olora-not-residual.* changed the base weight"),
        "mica-unfrozen": ("mica", {"residual": False}, r"freezes \['lora_B'\] for training, .* declares \[\]"),
    }
    for name, (peft_name, flags, message) in declared.items():

        def compute(inputs, peft_name=peft_name):
            return harvest(inputs, peft_name, seeded=False)

        register_variant(name, **flags)(compute)
        with pytest.raises(PeftInitError, match=message):
            inilora_init(tiny_llama(), variant=name, rank=RANK).prepare()

    pissa_init = LoraLayer.pissa_init

    def pissa_init_keeping_W0(layer, adapter_name, init_lora_weights):
        weight = layer.get_base_layer().weight.detach().clone()
        pissa_init(layer, adapter_name, init_lora_weights)
        layer.get_base_layer().weight.data = weight

    monkeypatch.setattr(LoraLayer, "pissa_init", pissa_init_keeping_W0)
    with pytest.raises(PeftInitError, match=r"'pissa_niter' on .* other than W0 − s·B·A"):
        inilora_init(tiny_llama(), variant="pissa_niter", rank=RANK).prepare()


def test_the_export_suite_covers_the_peft_inits() -> None:
    """`tests/test_convert.py` trains every gradient-free variant, exports it with `to_merged` / `to_lora` and reloads
    both in a process that never imports inilora_hf (one subprocess for all variants, so it stays fast)."""
    assert set(PEFT_NAMES) <= set(test_convert.VARIANTS)
