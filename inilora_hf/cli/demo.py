"""`inilora-hf demo`: factor set → SFTTrainer(model_init=...) → standard checkpoints, on a tiny model by default."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, cast

import torch
from datasets import Dataset
from peft import PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    PrinterCallback,
)
from trl import SFTConfig

from inilora_hf.convert.export import to_lora, to_merged
from inilora_hf.factorsets.report import InitReport
from inilora_hf.output_dirs import replacing_output_dir
from inilora_hf.training.model_init import inilora_init
from inilora_hf.training.sft import SFTTrainer

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]


def demo_dataset() -> Dataset:
    """The 96-row prompt/completion dataset shipped with the package (addition, reversal, upper-casing)."""
    text = resources.files("inilora_hf").joinpath("data/demo_sft.jsonl").read_text()
    return Dataset.from_list([json.loads(line) for line in text.splitlines() if line.strip()])


def char_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over `texts` (no download needed)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in sorted({c for t in texts for c in t}):
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def build_demo_base(directory: str | Path, *, seed: int = 0) -> Path:
    """Save a small Llama-style model (2 layers, hidden 64) and its tokenizer to `directory`, built from a config."""
    directory = Path(directory)
    dataset = demo_dataset()
    tokenizer = char_tokenizer([r["prompt"] + r["completion"] for r in dataset])
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@dataclass
class DemoResult:
    """What the demo produced and measured."""

    init_report: InitReport
    factor_source: str
    losses: list[float]
    paths: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    merged_max_logit_diff: float = float("nan")


def run_demo(
    output_dir: str | Path,
    *,
    model: str | None = None,
    variant: str = "inilora",
    rank: int = 8,
    fit_steps: int | None = None,
    train_steps: int = 40,
    learning_rate: float = 5e-3,
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
) -> DemoResult:
    """Compute a factor set, fine-tune with `inilora_hf.SFTTrainer(model_init=...)`, write standard checkpoints.

    Everything goes into `output_dir` (`base/` when no `model` is given, `factors/`, `adapter/`, `merged/`,
    `lora/`). A non-empty `output_dir` is refused before any work (`OutputExistsError`) unless `overwrite=True`;
    then it is replaced only once the new run is complete, and kept as it was if the run fails or is interrupted
    (a fresh folder is removed then).

    Example:
        >>> result = run_demo("demo-out", train_steps=10)                       # doctest: +SKIP
        >>> result.losses[0] > result.losses[-1]                                 # doctest: +SKIP
        True
    """
    with replacing_output_dir(output_dir, overwrite=overwrite) as folder:
        seconds: dict[str, float] = {}
        base = model or str(build_demo_base(folder / "base"))
        tokenizer = AutoTokenizer.from_pretrained(base)
        options: dict[str, Any] = {} if fit_steps is None or variant != "inilora" else {"steps": fit_steps}
        init = inilora_init(base, variant=variant, rank=rank, dtype=torch.float32, cache_dir=cache_dir, **options)

        args = SFTConfig(
            output_dir=str(folder / "run"),
            max_steps=train_steps,
            per_device_train_batch_size=8,
            learning_rate=learning_rate,
            lr_scheduler_type="constant",
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            bf16=False,
            gradient_checkpointing=False,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
            seed=0,
        )
        started = time.perf_counter()
        if not init.needs_calibration_data:
            init.prepare()
            seconds["factor set"] = time.perf_counter() - started
        trainer = SFTTrainer(model_init=init, args=args, train_dataset=demo_dataset(), processing_class=tokenizer)
        # A data-driven init (lora-sb) is computed while the trainer is built, from the trainer's own train data.
        seconds.setdefault("factor set", time.perf_counter() - started)
        trainer.remove_callback(PrinterCallback)  # the losses are summarised in the report instead
        started = time.perf_counter()
        trainer.train()
        seconds["training"] = time.perf_counter() - started
        trained = cast(PeftModel, trainer.model)  # the PeftModel that inilora_init built
        carrier: Any = trained  # `.factor_set` and `.init_report` are plain attributes set by `wrap_with_factors`
        trainer.save_model(str(folder / "adapter"))

        started = time.perf_counter()
        paths = {
            "factor set": folder / "factors",
            "adapter (+ init metadata)": folder / "adapter",
            "merged checkpoint": to_merged(trained, folder / "merged", tokenizer=tokenizer),
            "standard LoRA adapter": to_lora(trained, folder / "lora"),
        }
        carrier.factor_set.save_pretrained(paths["factor set"])
        seconds["export"] = time.perf_counter() - started

        ids = tokenizer(["add 2 3 = 5", "reverse cat = tac"], return_tensors="pt", padding=True)
        merged = AutoModelForCausalLM.from_pretrained(paths["merged checkpoint"], dtype=torch.float32)
        trained.eval()
        with torch.no_grad():
            expected = trained.get_base_model()(input_ids=ids["input_ids"]).logits
            actual = merged(input_ids=ids["input_ids"]).logits
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return DemoResult(
            init_report=carrier.init_report,
            factor_source=init.factor_source,
            losses=losses,
            paths=paths,
            seconds=seconds,
            merged_max_logit_diff=float((expected - actual).abs().max()),
        )
