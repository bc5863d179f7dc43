"""Calibration data for data-driven variants (`lora-sb`): exact sample selection, its content hash, and the
statistics computed from it on the plain model before PEFT wraps it.

* `calibration_set` turns a dataset (rows) or a dataloader (batches) into the exact list of model-input
  batches used: the first `calibration_samples` samples in order (the last batch truncated), collated on the
  CPU. Its sha256 over every tensor (dtype, shape, bytes) and the batch boundaries identifies the data.
* `calibrate` records that identity in `InitConfig.options["calibration"]` (`{"sha256", "samples"}`), and a
  derived `eta` in `options["eta"]`, before the cache key is formed: the same base, config and calibration
  samples hit the cache (no backward pass); any other data gives another key.
* `estimate_gradients` is LoRA-SB's gradient estimate: `G = Σ_batches ∇_W (loss_b / n_b)` for the target
  weights only, accumulated in fp32 on the CPU.
* `input_covariances` collects per-module input second moments `Σ x·xᵀ` with forward hooks (activation
  statistics for activation-based inits; no variant uses them yet).
* `first_step_learning_rate` / `offer_trainer_calibration`: what `inilora_hf.SFTTrainer` hands an init that
  needs data and was given none: its own prepared train dataset, collator, batch size, and the learning rate
  of the first optimizer step that moves the weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .log import get_logger
from .variants import get_variant

if TYPE_CHECKING:
    from .config import InitConfig

logger = get_logger(__name__)

DEFAULT_CALIBRATION_SAMPLES = 64
"""Samples used when `calibration_samples` is not given (fewer if the data holds fewer)."""
DEFAULT_BATCH_SIZE = 8
"""Rows per batch when the calibration data is a dataset of rows and no batch size is given."""
CALIBRATION_OPTION = "calibration"
"""`InitConfig.options` key holding the identity of the calibration samples (part of the cache key)."""

Batch = dict[str, Any]


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
        ValueError: `data` is empty, yields something that is not a dict with `input_ids`, or holds fewer
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
        if not isinstance(item, Mapping) or "input_ids" not in item:
            raise ValueError(
                f"Calibration data must yield dicts with `input_ids` (rows or batches), got {type(item).__name__}. "
                "Tokenize the dataset first, or pass a DataLoader whose batches are model inputs."
            )
        if _is_batch(item):
            if pending:
                raise ValueError("Calibration data mixes single rows and batches; pass one or the other.")
            count = min(batch_length(item), limit - taken)
            batches.append(truncate_batch(dict(item), count) if count < batch_length(item) else dict(item))
            counts.append(count)
            taken += count
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
    masks = [_as_list(row["attention_mask"]) if "attention_mask" in row else [1] * len(i) for row, i in zip(rows, ids)]
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


def batch_length(batch: Mapping[str, Any]) -> int:
    """Number of samples in a batch (the first dimension of its `input_ids`)."""
    ids = batch["input_ids"]
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
        >>> a == batches_digest([{"input_ids": torch.tensor([[1, 2]])}]), a == batches_digest([{"input_ids": torch.tensor([[1], [2]])}])
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


def calibrate(
    config: InitConfig,
    source: CalibrationSource | None,
    model: nn.Module,
    *,
    default_eta: float | None = None,
) -> tuple[InitConfig, CalibrationSet]:
    """Read the calibration samples for a data-driven `config` and return the config that identifies them.

    The returned config has `options["calibration"] = {"sha256", "samples"}` and, if `options["eta"]` is
    None and `default_eta` is given (a trainer's first-step learning rate), `options["eta"] = default_eta`.

    Raises:
        ValueError: no calibration data, a variant that does not declare the `calibration` option, a
            quantized base, or a missing `eta`.

    Example:
        >>> config, cal = calibrate(InitConfig("lora-sb", rank=4, options={"eta": 1e-4}),   # doctest: +SKIP
        ...                         CalibrationSource(rows, samples=16), model)
    """
    spec = get_variant(config.variant)
    if CALIBRATION_OPTION not in spec.defaults:
        raise ValueError(
            f"Data-driven variant {spec.name!r} must declare `{CALIBRATION_OPTION}: None` among its defaults: "
            "inilora_hf records the identity of the calibration samples there, so that it is part of the cache key."
        )
    if config.quantization is not None:
        raise ValueError(
            f"Variant {spec.name!r} estimates gradients of the base weights, which a 4/8-bit base does not have. "
            "Compute the factor set on the full-precision model (no quantization_config), or pick another variant."
        )
    if source is None or source.data is None:
        raise ValueError(
            f"Variant {spec.name!r} is data-driven and got no calibration data. Pass `calibration_data=` (a tokenized "
            "dataset or a DataLoader) to inilora_init, or train with `inilora_hf.SFTTrainer(model_init=...)`, "
            "which hands the init its own train dataset."
        )
    options = dict(config.options)
    if "eta" in options and options["eta"] is None:
        if default_eta is None:
            raise ValueError(
                f"Variant {spec.name!r} needs `eta`, the learning rate of the first optimizer step (e.g. "
                "learning_rate / warmup_steps with a linear warmup, or learning_rate without warmup): pass "
                "`inilora_init(..., eta=...)`, or train with `inilora_hf.SFTTrainer(model_init=...)`, which derives "
                "it from its arguments."
            )
        options["eta"] = float(default_eta)
    pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None)
    cal = calibration_set(
        source.data,
        samples=source.samples,
        batch_size=source.batch_size,
        collate_fn=source.collate_fn,
        pad_token_id=pad_token_id if isinstance(pad_token_id, int) else 0,
    )
    options[CALIBRATION_OPTION] = cal.identity()
    logger.info(
        "Calibration: %d samples in %d batches (sha256 %s…), eta=%s.",
        cal.samples, len(cal.batches), cal.sha256[:12], options.get("eta"),
    )
    return dataclasses.replace(config, options=options), cal


def estimate_gradients(
    model: nn.Module,
    batches: Sequence[Mapping[str, Any]],
    target_names: Iterable[str],
    *,
    sample_counts: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """LoRA-SB's gradient estimate: `G[name] = Σ_b ∇_W (loss_b / n_b)` of each target module's weight.

    `loss_b` is the model's own loss on batch `b` (the batches must carry `labels`) and `n_b` its number of
    samples (`sample_counts`, default the first dimension of each batch's `input_ids`), as in the reference
    code (`utils/gradient_utils.py`). The model runs in train mode, as in the
    reference (dropout active), under a forked RNG seeded with 0, so the estimate is reproducible and the
    caller's RNG state is untouched.

    Memory stays bounded: only the target weights require grad during the passes (no other parameter gets
    a gradient), and a post-accumulate hook moves each weight gradient into an fp32 CPU sum and frees it at
    once. Afterwards every parameter's `requires_grad`, the targets' `.grad`, and the train/eval mode are
    restored; parameters are never modified.

    Returns:
        Module name → fp32 `(out, in)` gradient sum on the CPU.

    Example:
        >>> cal = calibration_set(rows, samples=16)                                              # doctest: +SKIP
        >>> grads = estimate_gradients(model, cal.batches, ["model.layers.0.self_attn.q_proj"],   # doctest: +SKIP
        ...                            sample_counts=cal.sample_counts)
    """
    names = list(target_names)
    counts = list(sample_counts) if sample_counts is not None else [batch_length(b) for b in batches]
    if len(counts) != len(batches):
        raise ValueError(f"{len(counts)} sample counts for {len(batches)} calibration batches.")
    weights = {name: model.get_submodule(name).weight for name in names}
    owners: dict[int, list[str]] = {}
    for name, weight in weights.items():
        owners.setdefault(id(weight), []).append(name)
    sums = {name: torch.zeros(weight.shape, dtype=torch.float32) for name, weight in weights.items()}
    parameters = list(model.parameters())
    flags = [p.requires_grad for p in parameters]
    saved_grads = {name: weight.grad for name, weight in weights.items()}
    was_training = model.training
    device = _input_device(model)
    handles = []
    try:
        for parameter in parameters:
            parameter.requires_grad_(False)
        for name, weight in weights.items():
            if not weight.is_floating_point():
                raise ValueError(f"The weight of {name!r} is {weight.dtype}; gradients need a floating-point base model.")
            weight.grad = None
            weight.requires_grad_(True)
        for group in owners.values():
            handles.append(weights[group[0]].register_post_accumulate_grad_hook(partial(_accumulate, [sums[n] for n in group])))
        model.train()
        rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.enable_grad(), torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(0)
            for index, batch in enumerate(batches):
                outputs = model(**_to_device(batch, device))
                loss = getattr(outputs, "loss", None)
                if loss is None:
                    raise ValueError(
                        "The model returned no loss for a calibration batch: the batches need `labels` (the default "
                        "collator adds them; a custom collate_fn or DataLoader must too)."
                    )
                if not torch.isfinite(loss):
                    raise ValueError(f"The loss of calibration batch {index} is {loss.item()}; check the data.")
                (loss / counts[index]).backward()
    finally:
        for handle in handles:
            handle.remove()
        for parameter, flag in zip(parameters, flags):
            parameter.requires_grad_(flag)
        for name, weight in weights.items():
            weight.grad = saved_grads[name]
        model.train(was_training)
    return sums


def input_covariances(
    model: nn.Module, batches: Sequence[Mapping[str, Any]], target_names: Iterable[str]
) -> dict[str, torch.Tensor]:
    """Per target module, the fp32 second moment `Σ x·xᵀ` `(in, in)` of its inputs over all non-padding tokens,
    collected with forward hooks in eval mode without gradients (activation statistics for activation-based
    inits such as CorDA / CNTLoRA). Memory: one `(in, in)` fp32 matrix per module, on the CPU.

    Tokens whose `attention_mask` is 0 are left out when the module input is `(batch, seq, in)` like the
    mask; the returned dict also has `"__tokens__"`, the number of tokens counted.

    Example:
        >>> cov = input_covariances(model, calibration_set(rows, samples=8).batches, ["model.layers.0.mlp.down_proj"])  # doctest: +SKIP
    """
    names = list(target_names)
    sums = {name: None for name in names}
    state: dict[str, Any] = {"mask": None, "tokens": 0}
    was_training = model.training
    device = _input_device(model)

    def hook(name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        x = x.detach().float()
        mask = state["mask"]
        if mask is not None and x.ndim == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
            x = x[mask.to(x.device).bool()]
        x = x.reshape(-1, x.shape[-1])
        moment = (x.T @ x).cpu()
        sums[name] = moment if sums[name] is None else sums[name].add_(moment)
        if name == names[0]:
            state["tokens"] += x.shape[0]

    handles = [
        model.get_submodule(name).register_forward_pre_hook(partial(hook, name), with_kwargs=True) for name in names
    ]
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                state["mask"] = batch.get("attention_mask")
                model(**{k: v for k, v in _to_device(batch, device).items() if k != "labels"})
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    result = {name: total for name, total in sums.items() if total is not None}
    result["__tokens__"] = torch.tensor(state["tokens"])
    return result


def first_step_learning_rate(args: Any, num_training_steps: int) -> float:
    """The learning rate of the first optimizer step that moves the weights under `args`' schedule.

    Builds the trainer's own scheduler (`transformers.get_scheduler` with `args.lr_scheduler_type`,
    `args.get_warmup_steps(num_training_steps)` and `args.lr_scheduler_kwargs`) on a dummy optimizer and
    returns its first non-zero learning rate. With a linear warmup of `w` steps this is `learning_rate / w`
    (transformers' warmup starts at 0 on step 0), LoRA-SB's η (`lr / (warmup_ratio · total_steps)`) computed
    with the real number of optimizer steps; without warmup it is `learning_rate`.

    Example:
        >>> from transformers import TrainingArguments
        >>> args = TrainingArguments("out", learning_rate=1e-3, warmup_steps=10, report_to="none")
        >>> first_step_learning_rate(args, 100)
        0.0001
    """
    from transformers.optimization import get_scheduler

    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=args.learning_rate)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.get_warmup_steps(num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=dict(args.lr_scheduler_kwargs or {}),
    )
    for _ in range(max(1, num_training_steps)):
        rate = float(optimizer.param_groups[0]["lr"])
        if rate > 0:
            return rate
        optimizer.step()
        scheduler.step()
    raise ValueError(f"The learning-rate schedule of these arguments never leaves 0 in {num_training_steps} steps.")


def trainer_training_steps(trainer: Any) -> int | None:
    """Optimizer steps the trainer will run (`args.max_steps`, or epochs × steps per epoch), None if unknown."""
    args = trainer.args
    if args.max_steps > 0:
        return int(args.max_steps)
    dataset = trainer.train_dataset
    try:
        rows = len(dataset)
    except TypeError:
        return None
    batch = args.train_batch_size * max(1, args.world_size)
    batches = rows // batch if args.dataloader_drop_last else math.ceil(rows / batch)
    per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def offer_trainer_calibration(init: Any, trainer: Any) -> None:
    """Hand `init` (an `InitFunction`) the trainer's prepared train dataset, collator and per-device batch size
    as default calibration data, and the first-step learning rate as default `eta`. Explicit
    `inilora_init(calibration_data=..., eta=...)` arguments take precedence.

    Example:
        >>> offer_trainer_calibration(init, trainer)   # what inilora_hf.SFTTrainer does   # doctest: +SKIP
    """
    steps = trainer_training_steps(trainer)
    eta = None
    if steps is not None:
        try:
            eta = first_step_learning_rate(trainer.args, steps)
        except (ValueError, TypeError) as error:
            logger.warning("Could not derive eta from the training arguments (%s); pass inilora_init(..., eta=...).", error)
    init.set_default_calibration(
        trainer.train_dataset,
        batch_size=trainer.args.per_device_train_batch_size,
        collate_fn=trainer.data_collator,
        eta=eta,
    )


# ---------------------------------------------------------------------------------------------------- helpers


def _iterate(data: Any) -> Iterator[Any]:
    if isinstance(data, Mapping):
        yield data  # a single batch
        return
    try:
        iterator = iter(data)
    except TypeError:
        raise ValueError(
            f"Calibration data must be a dataset, a list of rows or batches, or a DataLoader; got {type(data).__name__}."
        ) from None
    yield from iterator


def _is_batch(item: Mapping[str, Any]) -> bool:
    ids = item["input_ids"]
    return torch.is_tensor(ids) and ids.ndim == 2


def _as_list(value: Any) -> list:
    return value.tolist() if torch.is_tensor(value) else list(value)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) or (torch.is_tensor(value) and value.ndim == 0)


def _as_scalar(value: Any) -> int | float:
    return value.item() if torch.is_tensor(value) else value


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _to_device(batch: Mapping[str, Any], device: torch.device) -> Batch:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _accumulate(totals: list[torch.Tensor], weight: torch.Tensor) -> None:
    gradient = weight.grad.detach().float().to("cpu")
    for total in totals:
        total.add_(gradient)
    weight.grad = None  # freed as soon as it is summed: no gradient outlives its backward pass
