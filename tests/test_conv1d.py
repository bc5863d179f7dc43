"""GPT-2's `Conv1D` layers (weight stored `in × out`, PEFT's `fan_in_fan_out`): the layout a factor set records,
streamed computation from the checkpoint files, the Hub `init_adapter/` and its card snippet, quantized bases,
and the demo on a saved tiny GPT-2.

The matrix (`tests/test_families.py`) covers init, training and both exports for GPT-2 (and LoRA-SB's exports on
Conv1D layers); these are the paths only a Conv1D model exercises.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from inilora_hf import FactorSet, InitConfig, inilora_init, load_trained
from inilora_hf.cli.app import main
from inilora_hf.cli.demo import char_tokenizer, demo_dataset
from inilora_hf.errors import FactorSetMismatchError
from inilora_hf.factorsets.publish import push_factor_set
from inilora_hf.factorsets.streaming import compute_streamed
from tests import helpers
from tests.helpers import fp32_gamma

# c_attn 192×64; attn.c_proj 64×64 is square, so a transposed weight would fit its shape too
TARGETS = ["c_attn", "attn.c_proj"]
TOLERANCE = 1e-5  # the design's fp32 invariant for outputs that must equal the base's, relative to max |logits|
INPUT_IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def tiny_gpt2(seed: int = 0, vocab_size: int = 128) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=vocab_size)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def gpt2_dir(tmp_path: Path) -> Path:
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits.float()


def relative_difference(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output - reference).abs().max() / reference.abs().max())


def as_linear(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """The same function with every Conv1D replaced by an `nn.Linear` holding the transposed weight."""
    linear = copy.deepcopy(model)
    for name, module in list(linear.named_modules()):
        if isinstance(module, Conv1D):
            replacement = torch.nn.Linear(module.nx, module.nf)
            replacement.weight.data = module.weight.detach().T.contiguous()
            replacement.bias.data = module.bias.detach().clone()
            parent, child = name.rsplit(".", 1)
            setattr(linear.get_submodule(parent), child, replacement)
    return linear


def test_factor_set_records_the_layout_and_is_never_applied_transposed(gpt2_dir: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    factor_set = inilora_init(gpt2_dir, variant="pissa", rank=4, target_modules=TARGETS).prepare()
    assert {fingerprint["layout"] for fingerprint in factor_set.fingerprints.values()} == {"conv1d"}
    shapes = {name: fingerprint["shape"] for name, fingerprint in factor_set.fingerprints.items() if ".h.0." in name}
    expected = {"transformer.h.0.attn.c_attn": [64, 192], "transformer.h.0.attn.c_proj": [64, 64]}
    assert shapes == expected, "shapes as stored (in × out)"
    # Factors are (r, in) / (out, r): the best rank-r approximation of the (out, in) weight.
    attn = "transformer.h.0.attn.c_attn"
    assert tuple(factor_set.factors[attn].lora_A.shape) == (4, 64)
    assert tuple(factor_set.factors[attn].lora_B.shape) == (192, 4)

    linear = as_linear(base)
    assert relative_difference(logits_of(linear), logits_of(base)) <= TOLERANCE, "the same function"
    with pytest.raises(FactorSetMismatchError, match=r"layout of a Linear .* computed for a conv1d layer"):
        inilora_init(linear, factors=factor_set)()
    # strict=False: the factors are layout-free ((out, in) view), so the residual is written right for a Linear too.
    model = inilora_init(linear, factors=factor_set, strict=False)().eval()
    assert relative_difference(logits_of(model), logits_of(base)) <= TOLERANCE
    assert (
        model.peft_config["default"].fan_in_fan_out is False
    )  # the recorded layout asks for it; PEFT turns it off for Linear


def test_streamed_computation_reads_conv1d_weights_in_their_layout(gpt2_dir: Path, tmp_path: Path, capsys) -> None:
    config = InitConfig("pissa", rank=4, target_modules=tuple(TARGETS))
    streamed = compute_streamed(gpt2_dir, config, tmp_path / "streamed", device="cpu")
    in_memory = inilora_init(gpt2_dir, variant="pissa", rank=4, target_modules=TARGETS, use_cache=False).prepare()
    assert streamed.fingerprints == in_memory.fingerprints
    for name, factors in in_memory.factors.items():
        assert torch.equal(streamed.factors[name].lora_A, factors.lora_A), name
        assert torch.equal(streamed.factors[name].lora_B, factors.lora_B), name
    assert main(["inspect", str(tmp_path / "streamed")]) == 0
    assert re.search(r"transformer\.h\.0\.attn\.c_attn\s+192x64\s", capsys.readouterr().out), "shown (out, in)"
    model = inilora_init(gpt2_dir, factors=tmp_path / "streamed")().eval()
    base = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    assert relative_difference(logits_of(model), logits_of(base)) <= TOLERANCE


def test_init_adapter_and_card_snippet_load_gpt2_with_plain_peft(hub, gpt2_dir: Path) -> None:
    hub.api.create_repo("org/tiny-gpt2")
    hub.api.upload_folder(repo_id="org/tiny-gpt2", folder_path=gpt2_dir)
    init = inilora_init("org/tiny-gpt2", variant="pissa", rank=4, target_modules=TARGETS)
    expected = logits_of(init().eval())
    push_factor_set(init.prepare(), "tester/tiny-gpt2-pissa")
    snapshot = Path(hub.api.snapshot_download("tester/tiny-gpt2-pissa"))
    card = ModelCard.load(snapshot / "README.md")
    snippet = re.search(r"Without inilora_hf.*?```python\n(.*?)```", card.text, re.S).group(1)
    namespace: dict = {}
    exec(compile(snippet, "model-card-snippet", "exec"), namespace)
    plain = namespace["model"].eval()
    assert plain.peft_config["default"].fan_in_fan_out is True
    assert relative_difference(logits_of(plain), expected) <= TOLERANCE


def test_a_saved_gpt2_checkpoint_is_rebuilt_exactly(gpt2_dir: Path, tmp_path: Path) -> None:
    model = inilora_init(gpt2_dir, variant="pissa", rank=4)()  # PEFT's default target for GPT-2: c_attn
    helpers.train_a_few_steps(model)
    model.save_pretrained(tmp_path / "checkpoint")
    rebuilt = load_trained(tmp_path / "checkpoint")
    assert torch.equal(logits_of(rebuilt), logits_of(model))  # the same fp32 operations on the same weights


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_gpt2_uses_the_untransposed_full_precision_weights(gpt2_dir: Path, bits: int) -> None:
    # transformers quantizes GPT-2's Conv1D layers as bitsandbytes Linear layers (out × in): the factors come from the
    # full-precision Conv1D weights, read as (out, in). A transposed W0 would put the square c_proj ~‖W0 − W0ᵀ‖ away.
    quantization = BitsAndBytesConfig(load_in_4bit=True) if bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
    model = inilora_init(gpt2_dir, variant="pissa", rank=4, target_modules=TARGETS, quantization_config=quantization)()
    full = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    rows = model.init_report.modules
    assert {row.storage_dtype for row in rows} == {f"bnb-{bits}bit"} and len(rows) == 4
    for row in rows:
        w0 = full.get_submodule(row.name).weight.detach().T  # Conv1D: stored in × out
        assert row.shape == tuple(w0.shape)
        # Q(R) + s·B·A is no further from W0 than plain QLoRA's Q(W0) (+ the fp32 rounding of the norms).
        assert row.quantized_init_error <= row.qlora_error * (1 + fp32_gamma(w0.numel())), row.name


def test_demo_runs_end_to_end_on_a_saved_tiny_gpt2(tmp_path: Path, capsys) -> None:
    dataset = demo_dataset()
    tokenizer = char_tokenizer([row["prompt"] + row["completion"] for row in dataset])
    tiny_gpt2(vocab_size=len(tokenizer)).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    args = ["demo", "--model", str(tmp_path / "gpt2"), "--output-dir", str(tmp_path / "demo"), "--rank", "4"]
    assert main([*args, "--steps", "50", "--train-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"transformer\.h\.1\.attn\.c_attn\s+192x64", out), "PEFT's default target for GPT-2"
    diff = float(re.search(r"max \|Δlogits\| = ([\d.e+-]+)", out).group(1))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "demo" / "merged")
    with torch.no_grad():
        scale = float(merged(input_ids=INPUT_IDS % len(tokenizer)).logits.abs().max())
    assert diff <= TOLERANCE * scale
    assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)


def test_cli_compute_targets_peft_default_for_the_model_type(gpt2_dir: Path, tmp_path: Path) -> None:
    """Without --targets, `compute` targets what PEFT's `get_peft_model` would (c_attn for GPT-2), as inilora_init."""
    assert main(["compute", str(gpt2_dir), "--out", str(tmp_path / "cli"), "--variant", "pissa", "--rank", "4"]) == 0
    streamed = FactorSet.from_pretrained(tmp_path / "cli")
    assert streamed.config.target_modules == ("c_attn",)
    in_memory = inilora_init(gpt2_dir, variant="pissa", rank=4, use_cache=False).prepare()
    assert sorted(streamed.factors) == sorted(in_memory.factors) == [f"transformer.h.{i}.attn.c_attn" for i in (0, 1)]
    for name, factors in in_memory.factors.items():
        torch.testing.assert_close(streamed.factors[name].lora_A, factors.lora_A, rtol=0, atol=1e-6)
