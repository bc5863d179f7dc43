"""PEFT's data-driven inits through inilora_hf (`eva`, `corda`, `lora_ga`).

Each is checked against plain PEFT on the same tiny Llama and the same calibration batches (built here, not by
inilora_hf): the same A, B, per-module ranks and scalings, effective weights within fp32 rounding, the base
model's outputs at init, a cache hit that runs no forward pass, a Trainer run whose `to_lora` / `to_merged` exports
reload without inilora_hf, `load_trained` and an exact resume; plus option and data errors, the SFTTrainer's own
train set and the command line.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model, initialize_lora_eva_weights, preprocess_loraga
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.config import CordaConfig, EvaConfig, LoraGAConfig
from peft.tuners.lora.corda import preprocess_corda
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
)
from trl import SFTConfig

from inilora_hf import SFTTrainer, get_variant, inilora_init, load_trained
from inilora_hf.cli.app import BUILTIN_VARIANTS
from inilora_hf.cli.demo import build_demo_base, demo_dataset
from inilora_hf.errors import CalibrationDataError, VariantOptionError
from inilora_hf.factorsets.publish import push_factor_set
from inilora_hf.trainer_callbacks import init_report_metrics
from inilora_hf.training.calibration import calibration_set
from tests import helpers
from tests.helpers import lora_state, make_trainer
from tests.test_convert import make_tiny_base
from tests.test_quantized import CONFIGS

VARIANTS = ["eva", "corda", "lora_ga"]
RANK, ALPHA = 4, 8  # scaling 2
TARGETS = ["q_proj", "v_proj", "down_proj"]
SAMPLES, BATCH = 12, 4
INPUT_IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))
SUB_CONFIGS = {
    "eva": {"eva_config": EvaConfig()},
    "corda": {"corda_config": CordaConfig()},
    "lora_ga": {"lora_ga_config": LoraGAConfig()},
}


def make_rows(seed: int = 0) -> list[dict]:
    """Token rows of lengths 9..16 (so batches are padded), no labels."""
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(4, 128, (9 + i % 8,), generator=generator).tolist()} for i in range(16)]


def reference_batches(rows: list[dict]) -> list[dict]:
    """The first SAMPLES rows in batches of BATCH, right-padded with 0, labels −100 on padding (written here
    independently of inilora_hf's collator)."""
    batches = []
    for start in range(0, SAMPLES, BATCH):
        chunk = [row["input_ids"] for row in rows[start : start + BATCH]]
        width = max(map(len, chunk))
        ids = torch.tensor([row + [0] * (width - len(row)) for row in chunk])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in chunk])
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return batches


def plain_peft(base_dir: Path, variant: str, rows: list[dict]) -> torch.nn.Module:
    """PEFT's own documented procedure for `variant`, seeded with 0 (LoRA-GA draws random numbers)."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=variant, **SUB_CONFIGS[variant]
    )
    batches = reference_batches(rows)
    torch.manual_seed(0)
    if variant == "corda":  # CorDA's hooks take one sample per forward pass
        samples = [row["input_ids"] for row in rows[:SAMPLES]]
        preprocess_corda(model, config, run_model=lambda: [model(input_ids=torch.tensor([s])) for s in samples])
    if variant == "lora_ga":
        preprocess_loraga(model, config, train_step=lambda: [model(**b).loss.backward() for b in batches])
    peft_model = get_peft_model(model, config)
    if variant == "eva":
        initialize_lora_eva_weights(peft_model, dataloader=batches, show_progress_bar=False)
    return peft_model


def make_init(variant: str, base_dir: Path, cache_dir: Path, rows: list[dict], **overrides):
    kwargs = dict(
        variant=variant,
        rank=RANK,
        lora_alpha=ALPHA,
        target_modules=TARGETS,
        calibration_data=rows,
        calibration_samples=SAMPLES,
        calibration_batch_size=BATCH,
        cache_dir=cache_dir,
    )
    return inilora_init(str(base_dir), **{**kwargs, **overrides})


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.fixture(scope="module", params=VARIANTS)
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Init, plain PEFT on the same data, a 4-step Trainer run (checkpoint every 2), both exports reloaded in a
    process that never imports inilora_hf, and a resume from checkpoint-2."""
    variant = request.param
    root = tmp_path_factory.mktemp(f"data-{variant}")
    base_dir, cache_dir, rows = make_tiny_base(root / "base"), root / "cache", make_rows()
    init = make_init(variant, base_dir, cache_dir, rows)
    initial = init()
    trained = helpers.train_export_resume(
        lambda: make_init(variant, base_dir, cache_dir, rows), base_dir, root, INPUT_IDS
    )
    trainer = trained["trainer"]
    max_rank = max(layer.r["default"] for layer in lora_layers(initial).values())
    return {
        "variant": variant,
        "root": root,
        "base": base_dir,
        "cache": cache_dir,
        "rows": rows,
        "init": init,
        "initial": initial,
        "plain": plain_peft(base_dir, variant, rows),
        **trained,
        "tolerance": helpers.fp32_logits_tolerance(trainer.model.get_base_model(), INPUT_IDS, 2 * max_rank),
    }


def test_variants_are_registered_with_peft_spellings() -> None:
    for name in VARIANTS:
        assert name in BUILTIN_VARIANTS
        assert get_variant(name).peft_data_pass and get_variant(name).needs_calibration
    assert get_variant("lora-ga").name == "lora_ga"
    assert [get_variant(v).residual for v in VARIANTS] == [False, True, True]


def test_same_factors_ranks_and_scalings_as_plain_peft(run: dict) -> None:
    plain, ours = lora_layers(run["plain"]), lora_layers(run["initial"])
    assert sorted(plain) == sorted(ours) == sorted(run["initial"].factor_set.factors)
    for name, layer in plain.items():
        # PEFT computes the factors in both runs with the same code on the same data: bit for bit.
        for part in ("lora_A", "lora_B"):
            assert torch.equal(getattr(layer, part)["default"].weight, getattr(ours[name], part)["default"].weight)
        assert layer.r["default"] == ours[name].r["default"], name
        assert layer.scaling["default"] == ours[name].scaling["default"], name


def test_effective_weights_equal_plain_peft_within_fp32_rounding(run: dict) -> None:
    """W' + s·B·A: PEFT's residual and inilora_hf's (recomputed in fp32 from the stored A, B) each are within
    γ_{r+2}·(|W0| + s·|B|·|A|) of the exact W0 − s·B·A; the effective weights then agree within twice that."""
    base = AutoModelForCausalLM.from_pretrained(run["base"], dtype=torch.float32)
    plain, ours = lora_layers(run["plain"]), lora_layers(run["initial"])
    for name, layer in plain.items():
        weight0 = base.get_submodule(name).weight.detach()
        A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        theirs = layer.get_base_layer().weight + s * B @ A
        mine = ours[name].get_base_layer().weight + s * B @ A
        bound = 3 * helpers.fp32_gamma(A.shape[0] + 2) * (weight0.abs() + s * B.abs() @ A.abs())
        assert bool(((theirs - mine).abs() <= bound).all()), name
        if not get_variant(run["variant"]).residual:  # EVA leaves W0 alone, in both
            assert torch.equal(ours[name].get_base_layer().weight, weight0)


def test_init_outputs_equal_the_base_models(run: dict) -> None:
    base = AutoModelForCausalLM.from_pretrained(run["base"], dtype=torch.float32).eval()
    expected = helpers.logits_of(base, INPUT_IDS)
    got = helpers.logits_of(run["initial"], INPUT_IDS)
    if run["variant"] == "eva":  # B = 0: the LoRA branch adds exact zeros
        assert torch.equal(got, expected)
    else:
        max_rank = max(layer.r["default"] for layer in lora_layers(run["initial"]).values())
        assert (got - expected).abs().max().item() <= helpers.fp32_logits_tolerance(base, INPUT_IDS, max_rank)


@pytest.mark.parametrize("run", ["eva"], indirect=True)
def test_eva_redistributes_ranks_into_the_factor_sets_patterns(run: dict) -> None:
    config = run["initial"].factor_set.config
    ranks = {name: layer.r["default"] for name, layer in lora_layers(run["initial"]).items()}
    assert len(set(ranks.values())) > 1, "the data should make EVA give the modules different ranks"
    assert sum(ranks.values()) == RANK * len(ranks)  # EVA keeps the total rank budget
    assert config.rank_pattern == {n: r for n, r in ranks.items() if r != RANK}
    # adjust_scaling_factors: alpha scales with the rank, so every module keeps scaling alpha / r = 2
    assert config.alpha_pattern == {n: ALPHA * r / RANK for n, r in ranks.items() if r != RANK}
    assert {layer.scaling["default"] for layer in lora_layers(run["initial"]).values()} == {ALPHA / RANK}


def test_second_init_with_the_same_data_runs_no_forward_pass(run: dict) -> None:
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: calls.append(args[0]))
    try:
        init = make_init(run["variant"], run["base"], run["cache"], run["rows"])
        again = init()
    finally:
        handle.remove()
    assert calls == []
    assert init.factor_source.startswith("cache:")
    # the checkpoint records the key the init used (EVA's stored config, with its ranks, hashes differently)
    metadata = json.loads((run["root"] / "first" / "checkpoint-4" / "inilora_init.json").read_text())
    assert init.factor_source == f"cache:{metadata['cache_key']}"
    assert init.config == run["init"].config  # with EVA's per-module ranks, as computed
    for name, factors in run["initial"].factor_set.factors.items():
        assert torch.equal(again.factor_set.factors[name].lora_A, factors.lora_A)
        assert torch.equal(again.factor_set.factors[name].lora_B, factors.lora_B)


def test_other_calibration_data_is_another_cache_entry(run: dict) -> None:
    init = make_init(run["variant"], run["base"], run["cache"], make_rows(seed=1))
    init.prepare()
    assert init.factor_source == "computed"
    assert init.config.options["calibration"]["sha256"] != run["init"].config.options["calibration"]["sha256"]


def test_exports_reload_without_inilora_hf_with_the_trained_outputs(run: dict) -> None:
    result = run["reload"]
    assert result["inilora_hf_imported"] is False
    for key in ("merged", "lora", "auto_lora"):
        assert result[key] <= run["tolerance"], key


@pytest.mark.parametrize("run", ["eva"], indirect=True)
def test_eva_ranks_survive_the_standard_lora_export(run: dict) -> None:
    saved = json.loads((run["root"] / "lora" / "adapter_config.json").read_text())
    config = run["initial"].factor_set.config
    assert (saved["r"], saved["lora_alpha"]) == (RANK, ALPHA)
    assert saved["rank_pattern"] == {re.escape(n): r for n, r in config.rank_pattern.items()}
    assert saved["alpha_pattern"] == {re.escape(n): a for n, a in config.alpha_pattern.items()}


def test_load_trained_rebuilds_the_trained_model(run: dict) -> None:
    rebuilt = load_trained(run["root"] / "first" / "checkpoint-4")
    assert {n: m.r["default"] for n, m in lora_layers(rebuilt).items()} == {
        n: m.r["default"] for n, m in lora_layers(run["initial"]).items()
    }
    difference = (helpers.logits_of(rebuilt, INPUT_IDS) - run["trained_logits"]).abs().max().item()
    assert difference <= run["tolerance"]


def test_resume_continues_the_run_exactly(run: dict) -> None:
    helpers.assert_same_lora_state(run["trainer"].model, run["resumed"].model)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("variant", "options", "message"),
    [
        ("eva", {"rho": 0.5}, "`rho` (EVA's rank redistribution) must be a number ≥ 1, got 0.5."),
        ("eva", {"tau": 2}, "`tau` (EVA's convergence threshold) must be in [0, 1], got 2."),
        ("eva", {"whiten": "yes"}, "`whiten` must be true or false, got 'yes'."),
        ("corda", {"corda_method": "svd"}, "`corda_method` must be 'ipm' or 'kpm', got 'svd'."),
        ("lora_ga", {"direction": "AB"}, "`direction` must be one of ('ArBr', 'A2rBr', 'ArB2r', 'random')"),
        ("lora_ga", {"stable_gamma": 0}, "`stable_gamma` must be a positive integer, got 0."),
        ("lora_ga", {"cache_file": "x.pt"}, "Unknown option(s) ['cache_file'] for variant 'lora_ga'"),
    ],
)
def test_bad_options_raise_a_named_error(variant: str, options: dict, message: str, tiny_base_dir: Path) -> None:
    with pytest.raises(VariantOptionError) as error:
        inilora_init(str(tiny_base_dir), variant=variant, calibration_data=make_rows(), **options)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("variant", VARIANTS)
def test_missing_data_says_how_to_pass_it(variant: str, tiny_base_dir: Path) -> None:
    init = inilora_init(str(tiny_base_dir), variant=variant, target_modules=TARGETS)
    assert init.needs_calibration_data
    with pytest.raises(CalibrationDataError, match=r"got no calibration data\. Pass `calibration_data=`"):
        init()


def test_eva_refuses_batches_with_fewer_tokens_than_components(tiny_base_dir: Path) -> None:
    short = [{"input_ids": [5, 6, 7]} for _ in range(4)]  # 2 rows of 3 tokens per batch < rank·rho = 8
    init = make_init("eva", tiny_base_dir, None, short, calibration_samples=4, calibration_batch_size=2)
    with pytest.raises(CalibrationDataError, match=r"at least rank·rho = 8 tokens .* batch 0 has 6"):
        init.prepare()


def test_eva_label_mask_refuses_one_label_per_sample_and_works_without_it(tiny_base_dir: Path) -> None:
    """PEFT would broadcast a (batch,) label mask against (batch, tokens) (an error, or a wrong mask when the two
    sizes agree): such data is refused with the fix, which then works."""
    rows = [{"input_ids": row["input_ids"], "labels": i % 2} for i, row in enumerate(make_rows())]
    with pytest.raises(CalibrationDataError, match=r"has labels of shape \(4,\) .* pass use_label_mask=False"):
        make_init("eva", tiny_base_dir, None, rows).prepare()
    classifier = {
        "model_class": AutoModelForSequenceClassification,
        "model_kwargs": {"num_labels": 2, "pad_token_id": 0},
    }
    with pytest.raises(CalibrationDataError, match="pass use_label_mask=False"):
        make_init("eva", tiny_base_dir, None, rows, **classifier).prepare()
    assert make_init("eva", tiny_base_dir, None, rows, use_label_mask=False, **classifier).prepare().factors


def test_sft_trainer_hands_eva_its_own_train_set(tmp_path: Path) -> None:
    base = build_demo_base(tmp_path / "base")
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=1,
        per_device_train_batch_size=8,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    init = inilora_init(base, variant="eva", rank=RANK, calibration_samples=16)
    trainer = SFTTrainer(
        model_init=init, args=args, train_dataset=demo_dataset(), processing_class=AutoTokenizer.from_pretrained(base)
    )
    expected = calibration_set(trainer.train_dataset, samples=16, batch_size=8, collate_fn=trainer.data_collator)
    assert init.config.options["calibration"] == {"sha256": expected.sha256, "samples": 16}
    assert init.factor_source == "computed"
    assert trainer.train().global_step == 1


def test_cli_compute_of_a_data_driven_variant_is_one_line(tiny_base_dir: Path, tmp_path: Path) -> None:
    script = str(Path(sys.executable).with_name("inilora-hf"))
    argv = [script, "compute", str(tiny_base_dir), "--out", str(tmp_path / "fs"), "--variant", "eva"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Variant 'eva' needs calibration data; use inilora_init(..., calibration_data=...)" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "fs").exists()


def test_the_callers_model_is_not_modified(tiny_base_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32)
    before = copy.deepcopy(model.state_dict())
    init = inilora_init(
        model, variant="corda", rank=RANK, target_modules=TARGETS, calibration_data=make_rows(), use_cache=False
    )
    init()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("run", ["eva"], indirect=True)
def test_report_metrics_and_checkpoint_metadata_give_each_modules_rank_and_scaling(run: dict) -> None:
    """With per-module ranks the report, the `init/*` metrics and the checkpoint metadata report each module's own
    rank and scaling (read here from the PEFT layers), not only the config's defaults."""
    layers = lora_layers(run["initial"])
    ranks = {name: layer.r["default"] for name, layer in layers.items()}
    scalings = {name: layer.scaling["default"] for name, layer in layers.items()}
    report = run["initial"].init_report
    assert {m.name: (m.rank, m.scaling) for m in report.modules} == {n: (ranks[n], scalings[n]) for n in ranks}
    assert report.rank_range == (min(ranks.values()), max(ranks.values()))
    assert f"rank={min(ranks.values())}..{max(ranks.values())}" in report.summary()
    metrics = init_report_metrics(report)
    assert (metrics["init/rank_min"], metrics["init/rank_max"]) == report.rank_range
    assert metrics["init/rank"] == sum(ranks.values()) / len(ranks)
    metadata = json.loads((run["root"] / "first" / "checkpoint-4" / "inilora_init.json").read_text())
    assert metadata["module_ranks"] == ranks
    assert metadata["module_scalings"] == scalings


def test_hub_round_trip_rebuilds_the_init_without_calibration_data(run: dict, hub) -> None:
    """Pushed to the (loopback) Hub and pulled by repo id with no calibration data at all: the same factors, ranks
    and outputs; the repo's `init_adapter/` config carries EVA's per-module ranks for plain PEFT."""
    repo = f"tester/tiny-llama-{run['variant'].replace('_', '-')}"
    push_factor_set(run["initial"].factor_set, repo)
    init = inilora_init(str(run["base"]), factors=repo)
    pulled = init()
    assert init.config == run["initial"].factor_set.config
    for name, factors in run["initial"].factor_set.factors.items():
        assert torch.equal(pulled.factor_set.factors[name].lora_A, factors.lora_A)
        assert torch.equal(pulled.factor_set.factors[name].lora_B, factors.lora_B)
    assert torch.equal(helpers.logits_of(pulled, INPUT_IDS), helpers.logits_of(run["initial"], INPUT_IDS))
    saved = json.loads((Path(hub.api.snapshot_download(repo)) / "init_adapter" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == {re.escape(n): r for n, r in run["initial"].factor_set.config.rank_pattern.items()}


# ------------------------------------------- PEFT's per-layer inits: Hub, resume, quantized base (README's table)

PER_LAYER = ["olora", "orthogonal", "pissa_niter", "mica"]


@pytest.mark.parametrize("variant", PER_LAYER)
def test_peft_per_layer_init_hub_round_trip(variant: str, tiny_base_dir: Path, hub) -> None:
    computed = inilora_init(str(tiny_base_dir), variant=variant, rank=RANK, target_modules=TARGETS)()
    repo = f"tester/tiny-llama-{variant.replace('_', '-')}"
    push_factor_set(computed.factor_set, repo)
    pulled = inilora_init(str(tiny_base_dir), factors=repo)()
    for name, factors in computed.factor_set.factors.items():
        assert torch.equal(pulled.factor_set.factors[name].lora_A, factors.lora_A)
        assert torch.equal(pulled.factor_set.factors[name].lora_B, factors.lora_B)
    assert torch.equal(helpers.logits_of(pulled, INPUT_IDS), helpers.logits_of(computed, INPUT_IDS))


@pytest.mark.parametrize("variant", ["orthogonal", "pissa_niter"])
def test_peft_per_layer_init_resume_continues_the_run_exactly(variant: str, tmp_path: Path) -> None:
    base_dir = make_tiny_base(tmp_path / "base")

    def trainer(folder: str) -> Trainer:
        init = inilora_init(str(base_dir), variant=variant, rank=RANK, target_modules=TARGETS, cache_dir=tmp_path)
        return make_trainer(init, tmp_path / folder)

    straight = trainer("first")
    straight.train()
    resumed = trainer("second")
    shutil.copytree(tmp_path / "first" / "checkpoint-2", tmp_path / "second" / "checkpoint-2")
    resumed.train(resume_from_checkpoint=str(tmp_path / "second" / "checkpoint-2"))
    expected, got = lora_state(straight.model), lora_state(resumed.model)
    assert sorted(expected) == sorted(got) and all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("variant", PER_LAYER)
def test_peft_per_layer_init_on_a_4bit_base_uses_the_full_precision_factors(variant: str, tiny_base_dir: Path) -> None:
    """On an nf4 base the factors are PEFT's, computed from the full-precision weights, rounded once to the
    adapter dtype (bf16) they train in; a base-mutating init's residual is quantized (like QLoRA's W0 otherwise)."""
    full = inilora_init(str(tiny_base_dir), variant=variant, rank=RANK, target_modules=TARGETS).prepare()
    quantized = inilora_init(
        str(tiny_base_dir), variant=variant, rank=RANK, target_modules=TARGETS, quantization_config=CONFIGS["nf4"]()
    )
    model = quantized()
    for name, factors in full.factors.items():
        layer = lora_layers(model)[name]
        assert torch.equal(layer.lora_A["default"].weight.float(), factors.lora_A.to(torch.bfloat16).float()), name
        assert torch.equal(layer.lora_B["default"].weight.float(), factors.lora_B.to(torch.bfloat16).float()), name
    residual = get_variant(variant).residual  # a residual is requantized and its fidelity reported
    assert all(m.storage_dtype == "bnb-4bit" for m in model.init_report.modules)
    assert all((m.quantized_init_error is not None) == residual for m in model.init_report.modules)


def test_eva_on_a_4bit_base_equals_plain_peft_on_that_base(tiny_base_dir: Path) -> None:
    """As with PEFT alone, EVA runs on the nf4 model (its layer inputs): the same ranks, A = PEFT's rounded once to
    the adapter dtype (bf16), B = 0, so the outputs are the quantized base's own; a second init is a cache hit."""
    rows = make_rows()
    quantized = {"quantization_config": CONFIGS["nf4"](), "calibration_batch_size": BATCH}
    init = make_init("eva", tiny_base_dir, None, rows, **quantized)
    ours = init()
    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir, quantization_config=CONFIGS["nf4"]())
    expected = helpers.logits_of(base, INPUT_IDS)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights="eva", **SUB_CONFIGS["eva"])
    plain = get_peft_model(base, config)
    initialize_lora_eva_weights(plain, dataloader=reference_batches(rows), show_progress_bar=False)
    plain_layers, our_layers = lora_layers(plain), lora_layers(ours)
    assert sorted(plain_layers) == sorted(our_layers)
    for name, layer in plain_layers.items():
        theirs, mine = layer.lora_A["default"].weight, our_layers[name].lora_A["default"].weight
        assert mine.dtype == torch.bfloat16 and torch.equal(mine, theirs.to(torch.bfloat16)), name
        assert layer.scaling["default"] == our_layers[name].scaling["default"], name
        assert not our_layers[name].lora_B["default"].weight.any()
    assert torch.equal(helpers.logits_of(ours, INPUT_IDS), expected)
    again = make_init("eva", tiny_base_dir, None, rows, **quantized)
    again.prepare()
    assert again.factor_source.startswith("cache:")


@pytest.mark.parametrize("variant", ["corda", "lora_ga"])
def test_data_driven_inits_refuse_a_quantized_base_with_the_fix(variant: str, tiny_base_dir: Path) -> None:
    init = make_init(variant, tiny_base_dir, None, make_rows(), quantization_config=CONFIGS["nf4"]())
    with pytest.raises(ValueError, match="runs its calibration pass on the full-precision base weights.*no quantiz"):
        init.prepare()
