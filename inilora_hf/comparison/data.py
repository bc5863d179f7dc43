"""The data of `compare`: a dataset from a local file, a Hub id or a `datasets.Dataset`, an eval split, and the
tokenized rows for a sequence-classification or causal-LM run.

Example:
    >>> rows = load_rows("reviews.jsonl")                                             # doctest: +SKIP
    >>> train, evaluation = split_eval(rows, eval_split=0.2)                          # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, load_dataset
from transformers import PreTrainedTokenizerBase

from inilora_hf.errors import CompareInputError
from inilora_hf.hub.transport import is_hub_id

TASKS = ("causal-lm", "seq-cls")
# File suffix → the `datasets` builder that reads it.
_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_rows(source: str | os.PathLike | Dataset, *, split: str = "train") -> Dataset:
    """A `Dataset` from a local .jsonl/.json/.csv/.parquet file, a Hub dataset id (its `split`), or a `Dataset`.

    Raises:
        CompareInputError: a missing file, or a path that is not a file of one of those kinds.

    Example:
        >>> load_rows(Dataset.from_dict({"text": ["a"]})).num_rows
        1
    """
    if isinstance(source, Dataset):
        return source
    path = Path(source)
    builder = _BUILDERS.get(path.suffix.lower())
    if path.is_file() and builder is not None:
        return load_dataset(builder, data_files=str(path), split="train")
    if builder is not None and not path.exists():
        raise CompareInputError(f"dataset file {str(source)!r} does not exist; check the path.")
    if path.exists() or builder is not None or not is_hub_id(str(source)):
        raise CompareInputError(
            f"dataset {str(source)!r} is not a .jsonl, .json, .csv or .parquet file nor a Hub dataset id; give one "
            "of those (or a datasets.Dataset in Python)."
        )
    return load_dataset(str(source), split=split)


def split_eval(rows: Dataset, *, eval_split: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, eval): a random `eval_split` fraction held out, the same for every run (a fixed `seed`, not a run's).

    Example:
        >>> train, evaluation = split_eval(Dataset.from_dict({"x": list(range(10))}), eval_split=0.2)
        >>> train.num_rows, evaluation.num_rows
        (8, 2)
    """
    if not 0.0 < eval_split < 1.0:
        raise CompareInputError(f"eval_split must be a fraction between 0 and 1, got {eval_split}.")
    parts = rows.train_test_split(test_size=eval_split, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def check_fields(rows: Dataset, fields: list[str], *, name: str) -> None:
    """Raise `CompareInputError` naming the missing field(s) and the columns there are."""
    missing = [field for field in fields if field not in rows.column_names]
    if missing:
        raise CompareInputError(
            f"the {name} dataset has no column {', '.join(map(repr, missing))} (columns: "
            f"{', '.join(rows.column_names)}); pass --text-field / --label-field (text_field= / label_field=)."
        )


@dataclass(frozen=True)
class Tokenized:
    """Tokenized train and eval rows, the class names of a classification task, and the eval rows' sha256."""

    train: Dataset
    evaluation: Dataset
    labels: list[str]
    eval_sha256: str


def tokenize(
    train: Dataset,
    evaluation: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    task: str,
    text_field: str,
    label_field: str,
    max_length: int,
) -> Tokenized:
    """Tokenize both splits (truncated to `max_length`, padded later per batch). For `seq-cls` the labels become
    class indices in the sorted order of the train labels' string forms (`labels`); for `causal-lm` every token is
    a target.

    Example:
        >>> tokenize(train, evaluation, tokenizer, task="seq-cls", text_field="text",         # doctest: +SKIP
        ...          label_field="label", max_length=128).labels
        ['fresh', 'rotten']
    """
    if task not in TASKS:
        raise CompareInputError(f"task must be one of {', '.join(TASKS)}, got {task!r}.")
    fields = [text_field, label_field] if task == "seq-cls" else [text_field]
    check_fields(train, fields, name="train")
    check_fields(evaluation, fields, name="eval")
    labels: list[str] = []
    if task == "seq-cls":
        labels = sorted({str(value) for value in train[label_field]})
        unknown = sorted({str(value) for value in evaluation[label_field]} - set(labels))
        if unknown:
            raise CompareInputError(f"eval labels {unknown} do not occur in the train data; classes: {labels}.")
    index = {name: i for i, name in enumerate(labels)}

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        encoded = dict(tokenizer(batch[text_field], truncation=True, max_length=max_length))
        if task == "seq-cls":
            encoded["labels"] = [index[str(value)] for value in batch[label_field]]
        return encoded

    def prepare(rows: Dataset) -> Dataset:
        return rows.map(encode, batched=True, remove_columns=rows.column_names)

    digest = hashlib.sha256()
    for row in evaluation.select_columns(fields):
        digest.update(json.dumps(row, sort_keys=True, default=str).encode())
    return Tokenized(prepare(train), prepare(evaluation), labels, digest.hexdigest())
