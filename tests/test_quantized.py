"""IniLoRA variants on 4-bit and 8-bit bitsandbytes bases (CPU): fidelity, refinement, training, conversion."""

from __future__ import annotations

import logging
import math

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from inilora_hf import SFTTrainer, inilora_init
from inilora_hf.cli.demo import build_demo_base, demo_dataset
from inilora_hf.factorsets.format import RESIDUAL_KEY
from tests.helpers import fp32_gamma, fp32_logits_tolerance, logits_of, sft_args

logger = logging.getLogger(__name__)

NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
CONFIGS = {"nf4": lambda: BitsAndBytesConfig(**NF4), "int8": lambda: BitsAndBytesConfig(load_in_8bit=True)}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return build_demo_base(tmp_path_factory.mktemp("qbase"))


def dequantized(module) -> torch.Tensor:
    """Independent dequantization with bitsandbytes' own functions (not inilora_hf's helpers)."""
    import bitsandbytes.functional as bnbf

    weight = module.weight
    if weight.__class__.__name__ == "Params4bit":
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    scales = weight.SCB if weight.SCB is not None else module.state.SCB
    return bnbf.int8_vectorwise_dequant(weight.data, scales).float()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_fidelity_report_matches_independent_dequantization(base_dir, kind) -> None:
    full = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    plain_qlora = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=CONFIGS[kind](), device_map="cpu")
    model = inilora_init(base_dir, variant="pissa", quantization_config=CONFIGS[kind]())()
    for row in model.init_report.modules:
        layer = model.get_base_model().get_submodule(row.name)
        w0 = full.get_submodule(row.name).weight.detach().float()
        lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert lora_A.dtype == torch.bfloat16  # factors stored in the dtype QLoRA trains in
        residual, qlora = dequantized(layer.base_layer), dequantized(plain_qlora.get_submodule(row.name))
        delta = layer.scaling["default"] * (lora_B.float() @ lora_A.float())
        expected_init = ((residual + delta - w0).norm() / w0.norm()).item()
        expected_qlora = ((qlora - w0).norm() / w0.norm()).item()
        # Both sides compute the same fp32 norms: each sums m·n squares (γ_mn), and each entry of the difference rounds
        # within γ_(r+2) of its terms' magnitude, relative to the difference's norm.
        magnitude = (
            residual.abs() + layer.scaling["default"] * (lora_B.float().abs() @ lora_A.float().abs()) + w0.abs()
        ).norm()
        init_rel = (
            fp32_gamma(row.shape[0] * row.shape[1])
            + fp32_gamma(lora_A.shape[0] + 2) * magnitude / (residual + delta - w0).norm()
        )
        qlora_rel = (
            fp32_gamma(row.shape[0] * row.shape[1])
            + fp32_gamma(1) * (qlora.abs() + w0.abs()).norm() / (qlora - w0).norm()
        )
        assert row.quantized_init_error == pytest.approx(expected_init, rel=2 * init_rel.item())
        assert row.qlora_error == pytest.approx(expected_qlora, rel=2 * qlora_rel.item())
        assert row.storage_dtype == ("bnb-4bit" if kind == "nf4" else "bnb-8bit")


def test_wide_init_is_flagged_and_refinement_helps_inilora(base_dir, caplog) -> None:
    with caplog.at_level("WARNING", logger="inilora_hf"):
        alpha = inilora_init(base_dir, variant="inilora-alpha", quantization_config=CONFIGS["nf4"]())()
    assert any("further from W0 than plain QLoRA" in r.getMessage() for r in caplog.records)
    assert all(m.quantized_init_error > 10 * m.qlora_error for m in alpha.init_report.modules)

    def mean_error(refine_steps: int) -> float:
        model = inilora_init(
            base_dir, variant="inilora", steps=300, refine_steps=refine_steps, quantization_config=CONFIGS["nf4"]()
        )()
        return sum(m.quantized_init_error for m in model.init_report.modules) / len(model.init_report.modules)

    one_shot, refined = mean_error(0), mean_error(3)
    assert refined < 0.9 * one_shot


def test_mismatched_quantization_settings_are_refused(base_dir, tmp_path) -> None:
    factor_set = inilora_init(base_dir, variant="pissa", quantization_config=CONFIGS["nf4"]()).prepare()
    factor_set.save_pretrained(tmp_path / "fs")
    assert factor_set.config.quantization["quant_type"] == "nf4" and factor_set.has_residual
    fp4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="computed for a quantized base with .*'nf4'.*'fp4'.*same BitsAndBytesConfig"):
        inilora_init(base_dir, factors=tmp_path / "fs", quantization_config=fp4)()
    # The same settings load it (and reuse its stored residual): R + s·B·A = W0 up to fp32 rounding, so what is left
    # is NF4's rounding of R, at most half the widest gap of bitsandbytes' NF4 code book times the block absmax
    # ≤ max|R|.
    model = inilora_init(base_dir, factors=tmp_path / "fs", quantization_config=CONFIGS["nf4"]())()
    full = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    half_gap = bnb.functional.get_4bit_type("nf4", device="cpu").diff().max().item() / 2
    for row in model.init_report.modules:
        factors, w0 = factor_set.factors[row.name], full.get_submodule(row.name).weight.detach()
        residual = factors.extra[RESIDUAL_KEY]
        delta_magnitude = factor_set.config.scaling * (factors.lora_B.abs() @ factors.lora_A.abs())
        magnitude = (w0.abs() + delta_magnitude + residual.abs()).max().item()
        rounding = 2 * fp32_gamma(factor_set.config.rank + 2) * magnitude
        assert row.reconstruction_max_abs <= half_gap * residual.abs().max().item() + rounding
    # A full-precision factor set is made quantization-ready on the fly for a quantized base.
    full_precision = inilora_init(base_dir, variant="pissa").prepare()
    assert full_precision.config.quantization is None and not full_precision.has_residual
    quantized = inilora_init(base_dir, factors=full_precision, quantization_config=CONFIGS["nf4"]())()
    rows = quantized.init_report.modules
    assert all(r.quantized_init_error is not None and r.quantized_init_error < r.qlora_error for r in rows)


def fp32_reference(trained, base_dir) -> torch.nn.Module:
    """A plain fp32 copy of the base model holding, built here with bitsandbytes' own dequantization, the weights the
    trained model stands for: deq(Q(R)) + s·B·A (fp32, from the trained factors) for every LoRA layer and deq(Q(W))
    for every other quantized layer."""
    reference = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, module in trained.get_base_model().named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                lora_A, lora_B = module.lora_A["default"].weight.float(), module.lora_B["default"].weight.float()
                weight = dequantized(module.base_layer) + module.scaling["default"] * (lora_B @ lora_A)
            elif isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) and not name.endswith(".base_layer"):
                weight = dequantized(module)
            else:
                continue
            reference.get_submodule(name).weight.copy_(weight)
    return reference.eval()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_sft_steps_save_and_merged_conversion(base_dir, tmp_path, kind, record_property) -> None:
    from inilora_hf.convert.export import to_merged

    rank = 8
    init = inilora_init(base_dir, variant="inilora", rank=rank, steps=200, quantization_config=CONFIGS[kind]())
    trainer = SFTTrainer(
        model_init=init,
        args=sft_args(tmp_path / "run"),
        train_dataset=demo_dataset(),
        processing_class=AutoTokenizer.from_pretrained(base_dir),
    )
    residual_before = dequantized(trainer.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer)
    trainer.train()
    layer = trainer.model.get_base_model().model.layers[0].self_attn.q_proj
    assert torch.equal(dequantized(layer.base_layer), residual_before)  # Q(R) is frozen
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    # Built before any eval forward: bitsandbytes may repack a 4-bit weight for its CPU kernel on the first one.
    reference = fp32_reference(trainer.model, base_dir)

    merged_dir = to_merged(trainer.model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert getattr(merged.config, "quantization_config", None) is None
    ids = torch.randint(4, 20, (2, 10), generator=torch.Generator().manual_seed(0))
    expected = logits_of(reference, ids)
    # The merged checkpoint is deq(Q(R)) + s·B·A in fp32, the reference's math: only fp32 rounding may differ (the
    # r-term product in each merged weight is counted like a LoRA branch).
    assert (logits_of(merged, ids) - expected).abs().max().item() <= fp32_logits_tolerance(reference, ids, rank)
    # The trained model itself runs its LoRA branch in bf16 (as QLoRA/TRL do) through bitsandbytes' CPU kernels (int8
    # layers also quantize their activations): its distance from that math depends on those kernels, so it is
    # measured and recorded (junit `property`, and an INFO log), not bounded.
    trainer.model.eval()
    gap = (logits_of(trainer.model, ids) - expected).abs().max().item()
    record_property(f"quantized_forward_vs_fp32_max_abs_dlogits[{kind}]", gap)
    logger.info(
        "%s: trained (bf16 LoRA, bitsandbytes kernels) vs fp32 deq(Q(R)) + s·B·A: max |Δlogits| = %.3g", kind, gap
    )
    assert math.isfinite(gap)
