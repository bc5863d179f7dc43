"""Per-module ranks (`rank_pattern` / `alpha_pattern`, PEFT's semantics) through factor sets: variants, apply,
cache, Trainer resume, `load_trained`, `to_lora` / `to_merged` reloaded without inilora_hf, and the Hub repo.

A tiny Llama, default rank 4 (alpha 4), `q_proj` at rank 8 (s = 4/8 = 0.5) and `v_proj` at alpha 16 (s = 16/4 = 4):
both scalings are powers of two, so `W0 / s` is exact in fp32 and the SVD optimum needs no extra rounding term.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from inilora_hf import FactorSet, InitConfig, get_variant, inilora_init
from inilora_hf.cli.app import BUILTIN_VARIANTS, main
from inilora_hf.factorsets.publish import push_factor_set
from inilora_hf.factorsets.streaming import compute_streamed
from inilora_hf.training import init_function
from inilora_hf.training.trained_model import load_trained
from tests import helpers
from tests.test_convert import make_tiny_base
from tests.test_hub import BASE_ID, _upload_base_model

INPUT_IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(4))
RANK_PATTERN = {"q_proj": 8}
ALPHA_PATTERN = {"v_proj": 16}
TARGETS = ["q_proj", "v_proj"]
# Independently of any code under test: module type → (rank, alpha) from the patterns above, default (4, 4).
EXPECTED = {"q_proj": (8, 4), "v_proj": (4, 16)}
VARIANTS = ["pissa", "inilora", "olora"]
OPTIONS = {"inilora": {"steps": 50}}
# `InitConfig(variant, rank=4, target_modules=["q_proj", "v_proj"]).config_hash()` computed on main before
# rank_pattern/alpha_pattern existed (commit cd8cd7b): configs without patterns must keep these cache keys.
HASHES_BEFORE_PATTERNS = {"pissa": "ec2bb7b9c3a6caeb", "inilora": "2b58e14a1042c9a3", "lora": "a91ab4448d1e9ddc"}


def module_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def make_init(variant: str, base_dir: Path, cache_dir: Path):
    return inilora_init(
        str(base_dir),
        variant=variant,
        rank=4,
        target_modules=TARGETS,
        rank_pattern=RANK_PATTERN,
        alpha_pattern=ALPHA_PATTERN,
        cache_dir=cache_dir,
        **OPTIONS.get(variant, {}),
    )


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.fixture(scope="module", params=VARIANTS)
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Init, a cache-hit re-init, a 4-step Trainer run (checkpoint every 2), a resume from checkpoint-2, both
    exports, and their reload in a process that never imports inilora_hf."""
    variant = request.param
    root = tmp_path_factory.mktemp(f"ranks-{variant}")
    base_dir, cache_dir = make_tiny_base(root / "base"), root / "cache"
    init = make_init(variant, base_dir, cache_dir)
    initial = init()
    trained = helpers.train_export_resume(lambda: make_init(variant, base_dir, cache_dir), base_dir, root, INPUT_IDS)
    trainer = trained["trainer"]
    return {
        "variant": variant,
        "root": root,
        "base": base_dir,
        "cache": cache_dir,
        "initial": initial,
        **trained,
        "tolerance": helpers.fp32_logits_tolerance(trainer.model.get_base_model(), INPUT_IDS, 2 * 8),
    }


def test_each_module_gets_its_rank_and_scaling(run: dict) -> None:
    layers = lora_layers(run["initial"])
    assert len(layers) == 4
    for name, layer in layers.items():
        rank, alpha = EXPECTED[module_type(name)]
        assert tuple(layer.lora_A["default"].weight.shape) == (rank, layer.in_features)
        assert tuple(layer.lora_B["default"].weight.shape) == (layer.out_features, rank)
        assert layer.scaling["default"] == alpha / rank
        factors = run["initial"].factor_set.factors[name.removeprefix("base_model.model.")]
        assert tuple(factors.lora_A.shape) == (rank, layer.in_features)


@pytest.mark.parametrize("run", ["pissa"], indirect=True)
def test_pissa_factors_are_the_svd_optimum_at_each_modules_rank(run: dict) -> None:
    base = AutoModelForCausalLM.from_pretrained(run["base"], dtype=torch.float32)
    for name, factors in run["initial"].factor_set.factors.items():
        rank, alpha = EXPECTED[module_type(name)]
        weight = base.get_submodule(name).weight.detach().double().numpy()
        U, S, Vt = np.linalg.svd(weight)
        optimum = (U[:, :rank] * S[:rank]) @ Vt[:rank]
        ours = (alpha / rank) * (factors.lora_B.double().numpy() @ factors.lora_A.double().numpy())
        assert np.abs(ours - optimum).max() <= helpers.truncated_svd_tolerance(S, weight.shape, rank), name


def test_init_outputs_equal_the_base_models(run: dict) -> None:
    base = AutoModelForCausalLM.from_pretrained(run["base"], dtype=torch.float32).eval()
    expected = helpers.logits_of(base, INPUT_IDS)
    tolerance = helpers.fp32_logits_tolerance(base, INPUT_IDS, lora_rank=8)
    assert (helpers.logits_of(run["initial"], INPUT_IDS) - expected).abs().max().item() <= tolerance


def test_plain_peft_with_the_same_patterns_builds_the_same_layers(run: dict) -> None:
    base = AutoModelForCausalLM.from_pretrained(run["base"], dtype=torch.float32)
    init_lora_weights = "olora" if run["variant"] == "olora" else True
    config = LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=TARGETS,
        rank_pattern=RANK_PATTERN,
        alpha_pattern=ALPHA_PATTERN,
        init_lora_weights=init_lora_weights,
    )
    plain, ours = lora_layers(get_peft_model(base, config)), lora_layers(run["initial"])
    assert sorted(plain) == sorted(ours)
    for name, layer in plain.items():
        for part in ("lora_A", "lora_B"):
            theirs, mine = getattr(layer, part)["default"].weight, getattr(ours[name], part)["default"].weight
            assert theirs.shape == mine.shape, name
            if init_lora_weights == "olora":  # PEFT's own olora at each module's rank: the same factors
                assert torch.equal(theirs, mine), name
        assert layer.scaling["default"] == ours[name].scaling["default"], name


def test_second_init_is_a_cache_hit(run: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compute(*args: object, **kwargs: object) -> None:
        raise AssertionError("the second init computed the factors again")

    monkeypatch.setattr(init_function, "compute_factor_set", no_compute)
    again = make_init(run["variant"], run["base"], run["cache"])()
    for name, factors in run["initial"].factor_set.factors.items():
        assert torch.equal(again.factor_set.factors[name].lora_A, factors.lora_A)
        assert torch.equal(again.factor_set.factors[name].lora_B, factors.lora_B)


def test_exports_reload_without_inilora_hf_with_the_trained_outputs(run: dict) -> None:
    result = run["reload"]
    assert result["inilora_hf_imported"] is False
    for key in ("merged", "lora", "auto_lora"):
        assert result[key] <= run["tolerance"], key
    saved = json.loads((run["root"] / "lora" / "adapter_config.json").read_text())
    factor = 2 if get_variant(run["variant"]).residual else 1
    names = sorted(run["initial"].factor_set.factors)
    q_names = [n for n in names if n.endswith("q_proj")]
    v_names = [n for n in names if n.endswith("v_proj")]
    assert (saved["r"], saved["lora_alpha"]) == (4 * factor, 4 * factor)
    assert saved["rank_pattern"] == {re.escape(n): 8 * factor for n in q_names}
    assert saved["alpha_pattern"] == {re.escape(n): 16 * factor for n in v_names}
    for card in (run["root"] / "lora" / "README.md", run["root"] / "first" / "checkpoint-4" / "README.md"):
        assert "rank_pattern {'q_proj': 8}, alpha_pattern {'v_proj': 16}" in card.read_text(), card


def test_load_trained_rebuilds_the_trained_model(run: dict) -> None:
    rebuilt = load_trained(run["root"] / "first" / "checkpoint-4")
    difference = (helpers.logits_of(rebuilt, INPUT_IDS) - run["trained_logits"]).abs().max().item()
    assert difference <= run["tolerance"]


def test_resume_continues_the_run_exactly(run: dict) -> None:
    helpers.assert_same_lora_state(run["trainer"].model, run["resumed"].model)


@pytest.mark.parametrize("variant", sorted(HASHES_BEFORE_PATTERNS))
def test_configs_without_patterns_keep_their_hash(variant: str) -> None:
    config = InitConfig(variant, rank=4, target_modules=TARGETS)
    assert config.config_hash() == HASHES_BEFORE_PATTERNS[variant]
    assert "rank_pattern" not in config.to_dict()
    patterned = InitConfig(variant, rank=4, target_modules=TARGETS, rank_pattern=RANK_PATTERN)
    assert patterned.config_hash() != config.config_hash()
    assert InitConfig.from_json(patterned.to_json()) == patterned


def test_patterns_match_module_names_as_peft_does() -> None:
    config = InitConfig("lora", rank=4, rank_pattern={"q_proj": 8, r"layers\.1\..*v_proj": 2})
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 8
    assert config.rank_for("model.layers.1.self_attn.v_proj") == 2
    assert config.rank_for("model.layers.0.self_attn.v_proj") == 4
    assert config.rank_for("model.layers.0.self_attn.xq_proj") == 4  # a key matches whole dotted components


@pytest.mark.parametrize(
    ("patterns", "message"),
    [
        ({"rank_pattern": {"q_proj": 0}}, "positive integer"),
        ({"rank_pattern": {"q_proj": 2.5}}, "positive integer"),
        ({"alpha_pattern": {"v_proj": -1}}, "positive number"),
        ({"rank_pattern": {"(": 8}}, "not a valid regular expression"),
        ({"rank_pattern": ["q_proj"]}, "must be a dict"),
    ],
)
def test_bad_patterns_are_refused_with_the_fix(patterns: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InitConfig("pissa", rank=4, **patterns)


@pytest.mark.parametrize("run", ["pissa"], indirect=True)
def test_hub_repo_carries_the_patterns_and_its_card_snippet_reproduces_the_init(run: dict, hub) -> None:
    factor_set = copy.deepcopy(run["initial"].factor_set)
    factor_set.base_model = BASE_ID
    _upload_base_model(hub, run["base"])
    repo = "tester/tiny-llama-ranks"
    push_factor_set(factor_set, repo)
    snapshot = Path(hub.api.snapshot_download(repo))
    saved = json.loads((snapshot / "init_adapter" / "adapter_config.json").read_text())
    q_names = [n for n in factor_set.factors if n.endswith("q_proj")]
    assert saved["rank_pattern"] == {re.escape(n): 8 for n in q_names}
    card = ModelCard.load(snapshot / "README.md")
    assert "| module | r | alpha | s |" in card.text
    assert f"| `{q_names[0]}` | 8 | 4 | 0.5 |" in card.text
    expected = helpers.logits_of(inilora_init(run["base"], factors=factor_set)(), INPUT_IDS)
    snippet = re.search(r"Without inilora_hf.*?```python\n(.*?)```", card.text, re.S).group(1)
    namespace: dict = {}
    exec(compile(snippet, "model-card-snippet", "exec"), namespace)
    assert isinstance(namespace["model"], PeftModel)
    base = AutoModelForCausalLM.from_pretrained(run["base"], dtype=torch.float32)
    tolerance = helpers.fp32_logits_tolerance(base, INPUT_IDS, lora_rank=8)
    assert (helpers.logits_of(namespace["model"], INPUT_IDS) - expected).abs().max().item() <= tolerance


@pytest.mark.parametrize("variant", BUILTIN_VARIANTS)
def test_every_variant_gives_same_shape_modules_their_own_ranks(variant: str, tiny_base_dir: Path) -> None:
    """Layer 0's and layer 1's q_proj have one shape but ranks 4 and 2: batched variants must not stack them."""
    layer1 = r"layers\.1\.self_attn\.q_proj"
    extra: dict = {"steps": 5} if variant == "inilora" else {}
    if get_variant(variant).needs_calibration:  # EVA with rho=1 keeps the ranks it is given
        rows = [{"input_ids": list(range(4 + i, 16 + i))} for i in range(4)]
        extra = {
            "calibration_data": rows,
            "calibration_batch_size": 2,
            **{"lora-sb": {"eta": 1e-3}, "eva": {"rho": 1.0}}.get(variant, {}),
        }
    init = inilora_init(
        tiny_base_dir,
        variant=variant,
        rank=4,
        target_modules=["q_proj"],
        rank_pattern={layer1: 2},
        alpha_pattern={layer1: 8},
        **extra,
    )
    layers = lora_layers(init())
    expected = {"model.layers.0.self_attn.q_proj": (4, 1.0), "model.layers.1.self_attn.q_proj": (2, 4.0)}
    assert {n.removeprefix("base_model.model."): l.lora_A["default"].weight.shape[0] for n, l in layers.items()} == {
        n: rank for n, (rank, _) in expected.items()
    }
    for name, layer in layers.items():
        rank, scaling = expected[name.removeprefix("base_model.model.")]
        assert layer.lora_B["default"].weight.shape == (64, rank)
        assert layer.scaling["default"] == scaling


@pytest.mark.parametrize("variant", ["pissa", "inilora"])
def test_streamed_compute_honours_the_patterns(variant: str, tiny_base_dir: Path, tmp_path: Path) -> None:
    """`compute_streamed` (one matrix per group) equals the in-memory init per module, each at its own rank and
    scaling: pissa within the fp32 SVD factor bound of `W0 / s`, inilora (σ̄ pooled from `W0 / s` per module)
    within the Adam drift bound of differently blocked fp32 arithmetic."""
    patterns = {"rank_pattern": {r"layers\.1\.self_attn\.q_proj": 2}, "alpha_pattern": {"v_proj": 16}}
    options = OPTIONS.get(variant, {})
    config = InitConfig(variant, rank=4, target_modules=TARGETS, options=options, **patterns)
    streamed = compute_streamed(tiny_base_dir, config, tmp_path / "out", max_memory=1, device="cpu")
    init = inilora_init(
        tiny_base_dir, variant=variant, rank=4, target_modules=TARGETS, use_cache=False, **options, **patterns
    )
    expected = init.prepare()
    assert streamed.config == expected.config
    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32)
    for name, factors in expected.factors.items():
        rank = 2 if name == "model.layers.1.self_attn.q_proj" else 4
        scaling = (16 if name.endswith("v_proj") else 4) / rank
        weight = base.get_submodule(name).weight.detach().double().numpy() / scaling
        if variant == "pissa":
            tolerance = helpers.svd_factor_tolerance(np.linalg.svd(weight, compute_uv=False), weight.shape, rank)
        else:
            tolerance = helpers.adam_drift_bound(options["steps"], 5e-4, accumulation=max(weight.shape) + rank + 3)
        assert streamed.factors[name].lora_A.shape == (rank, weight.shape[1])
        torch.testing.assert_close(streamed.factors[name].lora_A, factors.lora_A, atol=tolerance, rtol=0, msg=name)
        torch.testing.assert_close(streamed.factors[name].lora_B, factors.lora_B, atol=tolerance, rtol=0, msg=name)


def test_lora_config_kwargs_may_not_set_what_the_factor_set_determines(tiny_base_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"sets \['rank_pattern'\].*`rank_pattern=`"):
        inilora_init(tiny_base_dir, variant="pissa", rank=4, lora_config_kwargs={"rank_pattern": {"q_proj": 8}})


def test_cli_compute_takes_rank_and_alpha_patterns(
    tiny_base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fs"
    argv = ["compute", str(tiny_base_dir), "--out", str(out), "--variant", "pissa", "--rank", "4"]
    assert main([*argv, "--rank-pattern", "q_proj=8", "--alpha-pattern", r"layers\.1\..*=16"]) == 0
    factor_set = FactorSet.from_pretrained(out)
    assert (factor_set.config.rank_pattern, factor_set.config.alpha_pattern) == ({"q_proj": 8}, {r"layers\.1\..*": 16})
    assert factor_set.factors["model.layers.0.self_attn.q_proj"].lora_A.shape == (8, 64)
    assert factor_set.factors["model.layers.0.self_attn.v_proj"].lora_A.shape == (4, 64)
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "rank_pattern {'q_proj': 8}, alpha_pattern {'layers\\\\.1\\\\..*': 16}" in capsys.readouterr().out


def test_cli_bad_pattern_is_one_line_without_traceback(tiny_base_dir: Path, tmp_path: Path) -> None:
    script = str(Path(sys.executable).with_name("inilora-hf"))
    argv = [script, "compute", str(tiny_base_dir), "--out", str(tmp_path / "fs"), "--rank-pattern", "q_proj=0"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "rank_pattern['q_proj']` must be a positive integer" in run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "fs").exists()
