"""The architecture matrix: one tiny config per model family, the inputs of its modality, and the README table.

`FAMILIES` is the parameter list of `tests/test_families.py`; `render_table()` turns the same list into the README's
"Model families" table (`python -m tests.families` prints it, and a test checks the README holds exactly that).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import AutoConfig, PretrainedConfig

from inilora_hf.factorsets.targets import default_target_modules

#: Samples per batch in every input the matrix builds.
BATCH = 2
#: Sequence length of token inputs, and of decoder inputs.
TOKENS, DECODER_TOKENS = 12, 6
VOCAB = 128
#: Dropout keys set to 0 in every tiny config, so that train mode (the LoRA-SB gradient pass) is deterministic.
DROPOUT_KEYS = (
    "attention_dropout",
    "attention_probs_dropout_prob",
    "hidden_dropout",
    "hidden_dropout_prob",
    "dropout",
    "dropout_rate",
    "attn_pdrop",
    "resid_pdrop",
    "embd_pdrop",
    "activation_dropout",
)


@dataclass(frozen=True)
class Family:
    """One row of the matrix.

    Attributes:
        name: The family as the README names it.
        model_type: `AutoConfig.for_model` key (also the key of PEFT's default-target table).
        auto_class: The transformers `Auto…` class the family is fine-tuned with.
        modality: Which inputs it takes: `causal`, `seq-cls`, `seq2seq`, `image` or `speech`.
        task_type: The PEFT task type its exported adapter must record (None: PEFT has none for the task).
        config: Tiny sizes (and zero dropout) over the family's default config.
        targets: `target_modules` used by the test when the default (PEFT's) matches nothing in the family.
        note: Shown in the table's status column.
    """

    name: str
    model_type: str
    auto_class: str
    modality: str
    task_type: str | None
    config: dict[str, Any] = field(default_factory=dict)
    targets: tuple[str, ...] | None = None
    note: str = ""

    @property
    def residual_variant(self) -> str:
        """The residual variant the matrix trains and exports (`pissa`: exact, no fitting time)."""
        return "pissa"

    def tiny_config(self) -> PretrainedConfig:
        """The family's config with tiny sizes and every dropout at 0."""
        config = AutoConfig.for_model(self.model_type, **self.config)
        for key in DROPOUT_KEYS:
            if isinstance(getattr(config, key, None), float):
                setattr(config, key, 0.0)
        return config

    def model_class(self) -> type:
        """The concrete class `auto_class` builds for this family (e.g. `GPT2LMHeadModel`)."""
        auto = getattr(transformers, self.auto_class)
        return auto._model_mapping[type(self.tiny_config())]

    def inputs(self, seed: int, *, labels: bool = False, batch: int = BATCH) -> dict[str, torch.Tensor]:
        """Model inputs of this family's modality (with `labels` for training and the LoRA-SB gradient pass)."""
        generator = torch.Generator().manual_seed(seed)
        config = self.tiny_config()
        ids = torch.randint(4, VOCAB, (batch, TOKENS), generator=generator)
        decoder = torch.randint(4, VOCAB, (batch, DECODER_TOKENS), generator=generator)
        classes = torch.randint(0, 2, (batch,), generator=generator)
        if self.modality == "causal":
            return {"input_ids": ids, **({"labels": ids} if labels else {})}
        if self.modality == "seq-cls":
            return {"input_ids": ids, **({"labels": classes} if labels else {})}
        if self.modality == "seq2seq":
            return {"input_ids": ids, **({"labels": decoder} if labels else {"decoder_input_ids": decoder})}
        if self.modality == "image":
            size = (batch, config.num_channels, config.image_size, config.image_size)
            return {"pixel_values": torch.randn(size, generator=generator), **({"labels": classes} if labels else {})}
        if self.modality == "speech":
            size = (batch, config.num_mel_bins, 2 * config.max_source_positions)
            features = torch.randn(size, generator=generator)
            return {"input_features": features, **({"labels": decoder} if labels else {"decoder_input_ids": decoder})}
        raise ValueError(f"unknown modality {self.modality!r}")

    def default_targets(self) -> tuple[str, ...] | str:
        """What `inilora_init` targets by default for this family (PEFT's default for the model type)."""
        with torch.device("meta"):
            model = self.model_class()(self.tiny_config())
        return default_target_modules(model)


_DECODER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
_GQA = {**_DECODER, "num_key_value_heads": 2, "vocab_size": VOCAB}
_ENCODER_DECODER = {
    "d_model": 64,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
}

FAMILIES: tuple[Family, ...] = (
    Family("Llama", "llama", "AutoModelForCausalLM", "causal", "CAUSAL_LM", _GQA),
    Family("Mistral", "mistral", "AutoModelForCausalLM", "causal", "CAUSAL_LM", _GQA),
    Family("Qwen2", "qwen2", "AutoModelForCausalLM", "causal", "CAUSAL_LM", _GQA),
    Family("Qwen3", "qwen3", "AutoModelForCausalLM", "causal", "CAUSAL_LM", {**_GQA, "head_dim": 16}),
    Family("Gemma 2", "gemma2", "AutoModelForCausalLM", "causal", "CAUSAL_LM", {**_GQA, "head_dim": 16}),
    Family("Gemma 3", "gemma3_text", "AutoModelForCausalLM", "causal", "CAUSAL_LM", {**_GQA, "head_dim": 16}),
    Family(
        "Phi-3",
        "phi3",
        "AutoModelForCausalLM",
        "causal",
        "CAUSAL_LM",
        {**_GQA, "pad_token_id": 0},
        targets=("qkv_proj",),
    ),
    Family(
        "GPT-2",
        "gpt2",
        "AutoModelForCausalLM",
        "causal",
        "CAUSAL_LM",
        {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64, "vocab_size": VOCAB},
        note="Conv1D layers (`fan_in_fan_out`)",
    ),
    Family("GPT-NeoX", "gpt_neox", "AutoModelForCausalLM", "causal", "CAUSAL_LM", {**_DECODER, "vocab_size": VOCAB}),
    Family(
        "Falcon",
        "falcon",
        "AutoModelForCausalLM",
        "causal",
        "CAUSAL_LM",
        {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": VOCAB},
    ),
    Family(
        "Mixtral (MoE)",
        "mixtral",
        "AutoModelForCausalLM",
        "causal",
        "CAUSAL_LM",
        {**_GQA, "num_local_experts": 4, "num_experts_per_tok": 2},
        note="attention targets; the 3-D expert weights are refused with a named error",
    ),
    Family(
        "BERT",
        "bert",
        "AutoModelForSequenceClassification",
        "seq-cls",
        "SEQ_CLS",
        {**_DECODER, "vocab_size": VOCAB, "max_position_embeddings": 64},
    ),
    Family(
        "RoBERTa",
        "roberta",
        "AutoModelForSequenceClassification",
        "seq-cls",
        "SEQ_CLS",
        {**_DECODER, "vocab_size": VOCAB, "max_position_embeddings": 64, "pad_token_id": 1},
    ),
    Family(
        "T5",
        "t5",
        "AutoModelForSeq2SeqLM",
        "seq2seq",
        "SEQ_2_SEQ_LM",
        {
            "d_model": 64,
            "d_kv": 16,
            "d_ff": 128,
            "num_layers": 2,
            "num_heads": 4,
            "vocab_size": VOCAB,
            "decoder_start_token_id": 0,
        },
    ),
    Family(
        "BART",
        "bart",
        "AutoModelForSeq2SeqLM",
        "seq2seq",
        "SEQ_2_SEQ_LM",
        {
            **_ENCODER_DECODER,
            "vocab_size": VOCAB,
            "max_position_embeddings": 64,
        },
    ),
    Family(
        "ViT",
        "vit",
        "AutoModelForImageClassification",
        "image",
        None,
        {**_DECODER, "image_size": 16, "patch_size": 4},
    ),
    Family(
        "Whisper",
        "whisper",
        "AutoModelForSpeechSeq2Seq",
        "speech",
        None,
        {
            **_ENCODER_DECODER,
            "num_mel_bins": 16,
            "max_source_positions": 8,
            "max_target_positions": 32,
            "vocab_size": VOCAB,
            "pad_token_id": 0,
            "decoder_start_token_id": 1,
        },
    ),
)


def render_table(families: tuple[Family, ...] = FAMILIES) -> str:
    """The README's model-family table, one row per family of the matrix."""
    rows = [
        "| family | model class | default targets | variants tested | status |",
        "|---|---|---|---|---|",
    ]
    for family in families:
        default = family.default_targets()
        targets = f"`{default}`" if isinstance(default, str) else ", ".join(f"`{t}`" for t in default)
        if family.model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
            targets = f"{targets} (PEFT has none)" if family.targets is None else "none (PEFT has none): pass them"
        if family.targets is not None:
            targets += "; tested with " + ", ".join(f"`{t}`" for t in family.targets)
        variants = f"`{family.residual_variant}` (default targets and `all-linear`), `lora-sb`"
        status = "tested" + (f": {family.note}" if family.note else "")
        rows.append(f"| {family.name} | `{family.model_class().__name__}` | {targets} | {variants} | {status} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(render_table(), end="")
