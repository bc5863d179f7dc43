"""What `inilora_hf.SFTTrainer` hands an init that needs data and was given none: its own prepared train
dataset, collator and batch size, and the learning rate of the first optimizer step that moves the weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers.optimization import get_scheduler

from inilora_hf.log import get_logger

logger = get_logger(__name__)


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
            logger.warning(
                "Could not derive eta from the training arguments (%s); pass inilora_init(..., eta=...).", error
            )
    init.set_default_calibration(
        trainer.train_dataset,
        batch_size=trainer.args.per_device_train_batch_size,
        collate_fn=trainer.data_collator,
        eta=eta,
    )
