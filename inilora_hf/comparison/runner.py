"""One run of `compare`: build the model with `inilora_init`, train it with `transformers.Trainer(model_init=...)`,
evaluate it example by example. Everything but the init is fixed by the seed: the Trainer seeds the data order
(`seed`, `data_seed`) and the new head is drawn right after that seeding, before any variant code runs.

Example:
    >>> record = run_one(settings, data, tokenizer, variant="pissa", seed=0, options={},    # doctest: +SKIP
    ...                  work_dir="out/.tmp-run")
    >>> record["metrics"]["accuracy"]                                                        # doctest: +SKIP
    0.79
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from datasets import Dataset
from torch.nn import functional
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from inilora_hf.training.model_init import inilora_init
from inilora_hf.variants import get_variant

from .data import Tokenized
from .statistics import ratio_metric

IGNORE_INDEX = -100  # the label transformers' collators give padding, ignored by the loss
# Metric → its per-example (num, den) parts, per task; the first is the headline metric of the task.
METRICS = {"seq-cls": ("accuracy", "eval_loss"), "causal-lm": ("token_accuracy", "eval_loss")}


@dataclass(frozen=True)
class RunSettings:
    """What every run of a comparison shares (see `inilora_hf.compare` for each field)."""

    model: str
    task: str
    rank: int
    lora_alpha: float | None
    target_modules: tuple[str, ...]
    learning_rate: float
    max_steps: int
    batch_size: int
    eval_batch_size: int
    cache_dir: str | None


class _BatchRecordingTrainer(Trainer):
    """A `Trainer` that hashes the training batches it computes a loss on, in order (`batches_sha256`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batch_digest = hashlib.sha256()

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if model.training:
            for key in ("input_ids", "labels"):
                self.batch_digest.update(inputs[key].detach().cpu().numpy().tobytes())
        return super().compute_loss(model, inputs, *args, **kwargs)


class _HeadDigest(TrainerCallback):
    """sha256 of the trainable parameters other than the LoRA factors (a new head) when training starts."""

    def __init__(self) -> None:
        self.sha256: str | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        digest, found = hashlib.sha256(), False
        for name, parameter in sorted(model.named_parameters()):
            if parameter.requires_grad and "lora_" not in name:
                digest.update(name.encode() + parameter.detach().cpu().float().numpy().tobytes())
                found = True
        self.sha256 = digest.hexdigest() if found else None


def variant_options(variant: str, seed: int, options: Mapping[str, Any], *, task: str) -> dict[str, Any]:
    """The variant's options for a run: `options`, plus `seed` = the run's seed when the variant takes a seed and
    `options` sets none (a deterministic variant's factor set is then the same for every seed, computed once), and
    for `seq-cls` `use_label_mask=False` when the variant takes it and `options` does not set it (EVA's label mask is
    for token labels; a classification batch has one label per example).

    Example:
        >>> variant_options("lora", 3, {}, task="seq-cls"), variant_options("pissa", 3, {}, task="seq-cls")
        ({'seed': 3}, {})
        >>> variant_options("eva", 0, {}, task="seq-cls")["use_label_mask"]
        False
    """
    chosen = dict(options)
    defaults = get_variant(variant).defaults
    if "seed" in defaults:
        chosen.setdefault("seed", seed)
    if task == "seq-cls" and "use_label_mask" in defaults:
        chosen.setdefault("use_label_mask", False)
    return chosen


def _collator(task: str, tokenizer: PreTrainedTokenizerBase) -> Any:
    if task == "seq-cls":
        return DataCollatorWithPadding(tokenizer)
    return DataCollatorForLanguageModeling(tokenizer, mlm=False)


def evaluate_examples(
    model: torch.nn.Module, rows: Dataset, collator: Any, *, task: str, batch_size: int
) -> tuple[dict[str, dict[str, list[float]]], str]:
    """Per-example `(num, den)` of each metric of `task` (see `statistics`) and the sha256 of the predictions.

    `seq-cls`: accuracy (1 if the argmax is the label) and eval_loss (cross-entropy), `den` = 1. `causal-lm`:
    token_accuracy and eval_loss over the example's target tokens (next-token prediction), `den` = their count.
    """
    names = METRICS[task]
    # Batches of examples of similar length (longest first) pad little; the results go back to the rows' order.
    order = np.argsort([-len(ids) for ids in rows["input_ids"]], kind="stable")
    values: dict[str, list[np.ndarray]] = {name: [] for name in (*names, "den")}
    predicted: list[np.ndarray] = []
    device = next(model.parameters()).device
    model.eval()
    for batch in DataLoader(rows.select(order), batch_size=batch_size, shuffle=False, collate_fn=collator):
        batch = {key: value.to(device) for key, value in batch.items()}
        labels = batch.pop("labels")
        with torch.no_grad():
            logits = model(**batch).logits.float()
        if task == "seq-cls":
            predictions = logits.argmax(-1)
            losses = functional.cross_entropy(logits, labels, reduction="none")
            correct, counts = (predictions == labels).double(), torch.ones_like(losses, dtype=torch.float64)
            predicted += list(predictions.cpu().numpy()[:, None])
        else:
            logits, labels = logits[:, :-1], labels[:, 1:]
            mask = labels != IGNORE_INDEX
            token_losses = functional.cross_entropy(
                logits.transpose(1, 2), labels, reduction="none", ignore_index=IGNORE_INDEX
            )
            predictions = logits.argmax(-1)
            losses = token_losses.double().sum(-1)
            correct = ((predictions == labels) & mask).double().sum(-1)
            counts = mask.double().sum(-1)
            predicted += [row[keep] for row, keep in zip(predictions.cpu().numpy(), mask.cpu().numpy(), strict=True)]
        for key, tensor in zip((*names, "den"), (correct, losses, counts), strict=True):
            values[key].append(tensor.double().cpu().numpy())
    restore = np.argsort(order)  # position of each row in the sorted order
    columns = {key: np.concatenate(parts)[restore] for key, parts in values.items()}
    digest = hashlib.sha256()
    for position in restore:  # each example's predicted class / target-token predictions, in the rows' order
        digest.update(predicted[position].astype(np.int64).tobytes() + b"|")
    den = columns["den"].tolist()
    return {name: {"num": columns[name].tolist(), "den": den} for name in names}, digest.hexdigest()


def run_one(
    settings: RunSettings,
    data: Tokenized,
    tokenizer: PreTrainedTokenizerBase,
    *,
    variant: str,
    seed: int,
    options: Mapping[str, Any],
    work_dir: str | Path,
) -> dict[str, Any]:
    """Train and evaluate one variant × seed; returns its record (`variant`, `seed`, `options`, `metrics`,
    `history`, `per_example`, `predictions_sha256`, `batches_sha256`, `head_sha256`, `factor_source`, `seconds`)."""
    seq_cls = settings.task == "seq-cls"
    init = inilora_init(
        settings.model,
        variant=variant,
        rank=settings.rank,
        lora_alpha=settings.lora_alpha,
        target_modules=list(settings.target_modules),
        model_class=AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM,
        model_kwargs={"num_labels": len(data.labels)} if seq_cls else None,
        lora_config_kwargs={"task_type": "SEQ_CLS" if seq_cls else "CAUSAL_LM"},
        dtype=torch.float32,
        cache_dir=settings.cache_dir,
        **variant_options(variant, seed, options, task=settings.task),
    )
    collator = _collator(settings.task, tokenizer)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    if init.needs_calibration_data:
        init.set_default_calibration(
            data.train, batch_size=settings.batch_size, collate_fn=collator, eta=settings.learning_rate
        )
    else:
        init.prepare()
    seconds["factors"] = time.perf_counter() - started
    args = TrainingArguments(
        output_dir=str(work_dir),
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
        data_seed=seed,
    )
    head = _HeadDigest()
    started = time.perf_counter()
    trainer = _BatchRecordingTrainer(
        model_init=init, args=args, train_dataset=data.train, data_collator=collator, callbacks=[head]
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    seconds["train"] = time.perf_counter() - started
    started = time.perf_counter()
    trained = cast(torch.nn.Module, trainer.model)  # the PeftModel `init` built
    per_example, predictions_sha256 = evaluate_examples(
        trained, data.evaluation, collator, task=settings.task, batch_size=settings.eval_batch_size
    )
    seconds["eval"] = time.perf_counter() - started
    history = [{"step": entry["step"], "loss": entry["loss"]} for entry in trainer.state.log_history if "loss" in entry]
    return {
        "variant": variant,
        "seed": seed,
        "options": init.config.options,
        "metrics": {name: ratio_metric(np.array(p["num"]), np.array(p["den"])) for name, p in per_example.items()},
        "history": history,
        "per_example": per_example,
        "predictions_sha256": predictions_sha256,
        "batches_sha256": trainer.batch_digest.hexdigest(),
        "head_sha256": head.sha256,
        "factor_source": init.factor_source,
        "seconds": seconds,
    }
