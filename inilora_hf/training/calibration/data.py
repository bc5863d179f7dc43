"""Calibration samples: the exact model-input batches a data-driven init sees, and their content hash.

`calibration_set` turns a dataset (rows) or a dataloader (batches) into the exact list of model-input batches
used: the first `calibration_samples` samples in order (the last batch truncated), collated on the CPU. Its
sha256 over every tensor (dtype, shape, bytes) and the batch boundaries identifies the data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

DEFAULT_CALIBRATION_SAMPLES = 64
"""Samples used when `calibration_samples` is not given (fewer if the data holds fewer)."""
DEFAULT_BATCH_SIZE = 8
"""Rows per batch when the calibration data is a dataset of rows and no batch size is given."""
CALIBRATION_OPTION = "calibration"
"""`InitConfig.options` key holding the identity of the calibration samples (part of the cache key)."""

Batch = dict[str, Any]
#: The main model input of a sample (tokens, images, audio features) and its dimensions per sample.
INPUT_DIMS = {"input_ids": 1, "pixel_values": 3, "input_features": 2}


@dataclass(frozen=True)
class CalibrationSource:
    """Calibration data as given, before any sample is read.

    Attributes:
        data: A dataset of rows (`datasets.Dataset`, a list of dicts, any iterable of rows with `input_ids`)
            or of batches (a `torch.utils.data.DataLoader`, any iterable of dicts whose `input_ids` is 2-D).
        samples: Exactly how many samples to use (None: up to `DEFAULT_CALIBRATION_SAMPLES`).
        batch_size: Rows per batch for row data (None: `DEFAULT_BATCH_SIZE`). Ignored for batch data.
        collate_fn: Turns a list of rows into a batch (None: `pad_collate`). Ignored for batch data.
    """

    data: Any = None
    samples: int | None = None
    batch_size: int | None = None
    collate_fn: Callable[[list[Any]], Batch] | None = None

    def __post_init__(self) -> None:
        for name in ("samples", "batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`calibration_{name}` must be a positive integer, got {value!r}.")


@dataclass
class CalibrationSet:
    """The exact batches a data-driven init sees, and their identity.

    Attributes:
        batches: Model-input dicts (CPU tensors), in order; together exactly `samples` samples.
        sample_counts: Samples in each batch (counted as rows or batch rows before collation, so that a
            padding-free collator that packs a batch into one sequence still counts each sample).
        samples: Number of samples.
        sha256: Hash of every key, dtype, shape and byte of every batch, in order.
    """

    batches: list[Batch]
    sample_counts: list[int]
    samples: int
    sha256: str

    def identity(self) -> dict[str, Any]:
        """What goes into `InitConfig.options["calibration"]` (and therefore into the cache key)."""
        return {"sha256": self.sha256, "samples": self.samples}


def calibration_set(
    data: Any,
    *,
    samples: int | None = None,
    batch_size: int | None = None,
    collate_fn: Callable[[list[Any]], Batch] | None = None,
    pad_token_id: int = 0,
) -> CalibrationSet:
    """Read exactly `samples` samples (the first ones, in order) from `data` into model-input batches.

    Rows are grouped `batch_size` at a time and collated (`collate_fn`, default `pad_collate`); batches
    from a dataloader are used as they come, the last one truncated so that the total is exactly `samples`.
    Only as many rows / batches as needed are read.

    Args:
        data: Rows or batches, see `CalibrationSource`.
        samples: Exact sample count; None takes up to `DEFAULT_CALIBRATION_SAMPLES` (fewer if `data` is smaller).
        batch_size: Rows per batch for row data.
        collate_fn: Collator for row data.
        pad_token_id: Padding id for the default collator.

    Raises:
        ValueError: `data` is empty, yields something that is not a dict with `input_ids` (or a batch with
            `pixel_values` / `input_features`), or holds fewer
            than an explicitly requested `samples`.

    Example:
        >>> rows = [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}, {"input_ids": [6]}]
        >>> cal = calibration_set(rows, samples=2, batch_size=8)
        >>> cal.samples, cal.batches[0]["input_ids"].tolist(), cal.batches[0]["labels"].tolist()
        (2, [[1, 2, 3], [4, 5, 0]], [[1, 2, 3], [4, 5, -100]])
    """
    if data is None:
        raise ValueError("No calibration data: pass `calibration_data=` (a dataset or a dataloader).")
    limit = samples if samples is not None else DEFAULT_CALIBRATION_SAMPLES
    size = batch_size or DEFAULT_BATCH_SIZE
    collate = collate_fn or partial(pad_collate, pad_token_id=pad_token_id)
    batches: list[Batch] = []
    counts: list[int] = []
    taken = 0
    pending: list[Any] = []
    for item in _iterate(data):
        if not isinstance(item, Mapping) or input_key(item) is None:
            raise ValueError(
                f"Calibration data must yield dicts with `input_ids` (rows or batches), or batches with "
                f"`pixel_values` / `input_features`, got {type(item).__name__}. Tokenize the dataset first, or pass "
                "a DataLoader whose batches are model inputs."
            )
        if _is_batch(item):
            if pending:
                raise ValueError("Calibration data mixes single rows and batches; pass one or the other.")
            count = min(batch_length(item), limit - taken)
            batches.append(truncate_batch(dict(item), count) if count < batch_length(item) else dict(item))
            counts.append(count)
            taken += count
        elif input_key(item) != "input_ids" and collate_fn is None:
            raise ValueError(
                f"Calibration rows with `{input_key(item)}` need batching: pass a DataLoader (or a list of batches) "
                "whose batches are model inputs with `labels`."
            )
        else:
            pending.append(item)
            if len(pending) == min(size, limit - taken):
                batches.append(collate(pending))
                counts.append(len(pending))
                taken += len(pending)
                pending = []
        if taken >= limit:
            break
    if pending:
        batches.append(collate(pending))
        counts.append(len(pending))
        taken += len(pending)
    if taken == 0:
        raise ValueError("The calibration data is empty.")
    if samples is not None and taken < samples:
        raise ValueError(
            f"calibration_samples={samples}, but the calibration data holds only {taken} samples. Pass "
            f"calibration_samples≤{taken} or more data."
        )
    if any(count == 0 for count in counts):
        raise ValueError("A calibration batch has no samples; check the data loader.")
    return CalibrationSet(batches=batches, sample_counts=counts, samples=taken, sha256=batches_digest(batches))


def pad_collate(rows: Sequence[Mapping[str, Any]], *, pad_token_id: int = 0) -> Batch:
    """Right-pad token rows into a causal-LM batch: `input_ids`, `attention_mask`, `labels`.

    `labels` are the rows' own (sequences padded with -100, or one class id per row) or, when absent, the
    input ids with padding set to -100; `label` is accepted for `labels` as in transformers' default collator.
    `token_type_ids` are padded with 0 when present; other keys are ignored.

    Example:
        >>> pad_collate([{"input_ids": [5, 6]}, {"input_ids": [7]}])["attention_mask"].tolist()
        [[1, 1], [1, 0]]
    """
    ids = [_as_list(row["input_ids"]) for row in rows]
    width = max(len(row) for row in ids)
    masks = [
        _as_list(row["attention_mask"]) if "attention_mask" in row else [1] * len(i)
        for row, i in zip(rows, ids, strict=True)
    ]
    batch: Batch = {
        "input_ids": torch.tensor([row + [pad_token_id] * (width - len(row)) for row in ids], dtype=torch.long),
        "attention_mask": torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.long),
    }
    labels = [row.get("labels", row.get("label")) for row in rows]
    if all(label is None for label in labels):
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    elif all(_is_scalar(label) for label in labels):
        batch["labels"] = torch.tensor([_as_scalar(label) for label in labels])
    else:
        padded = [_as_list(label) for label in labels]
        batch["labels"] = torch.tensor([label + [-100] * (width - len(label)) for label in padded], dtype=torch.long)
    if all("token_type_ids" in row for row in rows):
        types = [_as_list(row["token_type_ids"]) for row in rows]
        batch["token_type_ids"] = torch.tensor([t + [0] * (width - len(t)) for t in types], dtype=torch.long)
    return batch


def input_key(item: Mapping[str, Any]) -> str | None:
    """The main model input of a row or batch: `input_ids`, `pixel_values` or `input_features` (None if none).

    Example:
        >>> input_key({"pixel_values": torch.zeros(2, 3, 8, 8), "labels": torch.tensor([0, 1])})
        'pixel_values'
    """
    return next((key for key in INPUT_DIMS if key in item), None)


def batch_length(batch: Mapping[str, Any]) -> int:
    """Number of samples in a batch (the first dimension of its `input_ids`, `pixel_values` or `input_features`)."""
    ids = batch[input_key(batch) or "input_ids"]
    return int(ids.shape[0]) if torch.is_tensor(ids) else len(ids)


def truncate_batch(batch: Batch, count: int) -> Batch:
    """The first `count` samples of a batch: every tensor / list whose first dimension is the batch size is cut."""
    size = batch_length(batch)
    cut: Batch = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == size:
            cut[key] = value[:count]
        elif isinstance(value, (list, tuple)) and len(value) == size:
            cut[key] = type(value)(value[:count])
        else:
            cut[key] = value
    return cut


def batches_digest(batches: Iterable[Mapping[str, Any]]) -> str:
    """sha256 of a sequence of batches: per batch, every key with its tensor's dtype, shape and bytes (or repr).

    Example:
        >>> a = batches_digest([{"input_ids": torch.tensor([[1, 2]])}])
        >>> b = batches_digest([{"input_ids": torch.tensor([[1], [2]])}])
        >>> a == batches_digest([{"input_ids": torch.tensor([[1, 2]])}]), a == b
        (True, False)
    """
    digest = hashlib.sha256()
    for index, batch in enumerate(batches):
        digest.update(f"batch {index}\n".encode())
        for key in sorted(batch):
            value = batch[key]
            if torch.is_tensor(value):
                flat = value.detach().to("cpu").contiguous().reshape(-1)
                digest.update(f"{key} {flat.dtype} {tuple(value.shape)}\n".encode())
                digest.update(flat.view(torch.uint8).numpy().tobytes())
            else:
                digest.update(f"{key} {value!r}\n".encode())
    return digest.hexdigest()


def _iterate(data: Any) -> Iterator[Any]:
    if isinstance(data, Mapping):
        yield data  # a single batch
        return
    try:
        iterator = iter(data)
    except TypeError:
        raise ValueError(
            "Calibration data must be a dataset, a list of rows or batches, or a DataLoader; "
            f"got {type(data).__name__}."
        ) from None
    yield from iterator


def _is_batch(item: Mapping[str, Any]) -> bool:
    key = input_key(item) or "input_ids"
    return torch.is_tensor(item[key]) and item[key].ndim == INPUT_DIMS[key] + 1


def _as_list(value: Any) -> list:
    return value.tolist() if torch.is_tensor(value) else list(value)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) or (torch.is_tensor(value) and value.ndim == 0)


def _as_scalar(value: Any) -> int | float:
    return value.item() if torch.is_tensor(value) else value
