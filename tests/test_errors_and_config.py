"""Bad input gets errors that name the problem and the fix; InitConfig validation, JSON and hashing."""

from __future__ import annotations

import pytest

from inilora_hf import InitConfig, TargetModuleError, inilora_init, register_variant
from inilora_hf.variants import ModuleFactors
from tests.conftest import tiny_llama


def test_unknown_variant_lists_known_names() -> None:
    with pytest.raises(ValueError, match=r"Unknown init variant 'inilora-gamma'.*inilora-alpha.*pissa"):
        inilora_init(tiny_llama(), variant="inilora-gamma")


def test_rank_larger_than_matrix_names_module_and_limit() -> None:
    with pytest.raises(
        ValueError,
        match=r"rank=40 is larger than min\(out_features, in_features\)=32 of 'model\.layers\.0\.self_attn\.v_proj'",
    ):
        inilora_init(tiny_llama(), variant="pissa", rank=40)()


def test_target_that_is_not_linear() -> None:
    with pytest.raises(TargetModuleError, match=r"'model\.embed_tokens' is a Embedding, not a torch\.nn\.Linear"):
        inilora_init(tiny_llama(), variant="lora", target_modules=["embed_tokens"])()


def test_target_that_matches_nothing_lists_linear_suffixes() -> None:
    with pytest.raises(TargetModuleError, match=r"matches no module.*q_proj.*v_proj"):
        inilora_init(tiny_llama(), variant="lora", target_modules=["query"])()


def test_negative_steps_and_unknown_options() -> None:
    with pytest.raises(ValueError, match="`steps` must be a non-negative integer, got -5"):
        inilora_init(tiny_llama(), variant="inilora", steps=-5)
    with pytest.raises(
        ValueError, match=r"Unknown option\(s\) \['stepz'\] for variant 'inilora'. Accepted options:.*steps"
    ):
        inilora_init(tiny_llama(), variant="inilora", stepz=10)
    with pytest.raises(ValueError, match="`kaiming` must be 'normal' or 'uniform'"):
        inilora_init(tiny_llama(), variant="inilora-beta", kaiming="xavier")


def test_peft_model_is_refused_as_base() -> None:
    model = inilora_init(tiny_llama(), variant="lora")()
    with pytest.raises(TypeError, match="needs the base model, not a PeftModel"):
        inilora_init(model)


def test_config_json_round_trip_and_stable_hash() -> None:
    config = InitConfig("inilora", rank=4, target_modules=["v_proj", "q_proj"], options={"steps": 100})
    again = InitConfig.from_json(config.to_json())
    assert again == config and again.config_hash() == config.config_hash()
    assert config.target_modules == ("q_proj", "v_proj")
    assert config.options["lr"] == 5e-4 and config.lora_alpha == 4 and config.scaling == 1.0
    # Same meaning, different spelling → same hash; a changed option → a different hash.
    assert (
        InitConfig(
            "inilora", rank=4, target_modules=["q_proj", "v_proj"], options={"steps": 100, "seed": 0}
        ).config_hash()
        == config.config_hash()
    )
    assert (
        InitConfig("inilora", rank=4, target_modules=["q_proj", "v_proj"], options={"steps": 101}).config_hash()
        != config.config_hash()
    )
    assert InitConfig("inilora", rank=4, use_rslora=True, lora_alpha=8).scaling == 4.0


def test_config_from_newer_format_is_refused() -> None:
    data = InitConfig("lora").to_dict()
    data["format_version"] = 99
    with pytest.raises(ValueError, match="newer inilora_hf.*Upgrade"):
        InitConfig.from_dict(data)


def test_register_variant_refuses_silent_overwrite() -> None:
    @register_variant("test-zero-b", residual=False, defaults={})
    def zero_b(inputs):
        r = inputs.config.rank
        return {
            n: ModuleFactors(w.new_ones(r, w.shape[1]), w.new_zeros(w.shape[0], r)) for n, w in inputs.weights.items()
        }

    with pytest.raises(ValueError, match="already registered"):
        register_variant("test-zero-b")(lambda inputs: {})
    model = inilora_init(tiny_llama(), variant="test-zero-b", rank=2)()
    assert model.init_report.variant == "test-zero-b"
