"""Statistics of the plain model on calibration batches: LoRA-SB's gradient estimate and input second moments.

* `estimate_gradients`: `G = Σ_batches ∇_W (loss_b / n_b)` for the target weights only, accumulated in fp32 on
  the CPU.
* `input_covariances`: per-module input second moments `Σ x·xᵀ` with forward hooks (activation statistics for
  activation-based inits; no variant uses them yet).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import Any, cast

import torch
from torch import nn

from inilora_hf.factorsets.targets import to_layout

from .data import Batch, batch_length


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
        Module name → fp32 `(out, in)` gradient sum on the CPU (transposed for Conv1D layers, which store
        their weight `in × out`).

    Example:
        >>> cal = calibration_set(rows, samples=16)                                              # doctest: +SKIP
        >>> grads = estimate_gradients(model, cal.batches, ["model.layers.0.self_attn.q_proj"],   # doctest: +SKIP
        ...                            sample_counts=cal.sample_counts)
    """
    names = list(target_names)
    counts = list(sample_counts) if sample_counts is not None else [batch_length(b) for b in batches]
    if len(counts) != len(batches):
        raise ValueError(f"{len(counts)} sample counts for {len(batches)} calibration batches.")
    weights = {name: model.get_parameter(f"{name}.weight") for name in names}
    owners: dict[int, list[str]] = {}
    for name, weight in weights.items():
        owners.setdefault(id(weight), []).append(name)
    sums = {name: torch.zeros(weight.shape, dtype=torch.float32) for name, weight in weights.items()}
    parameters = list(model.parameters())
    flags = [p.requires_grad for p in parameters]
    saved_grads = {name: weight.grad for name, weight in weights.items()}
    was_training = model.training
    device = input_device(model)
    handles = []
    try:
        for parameter in parameters:
            parameter.requires_grad_(False)
        for name, weight in weights.items():
            if not weight.is_floating_point():
                raise ValueError(
                    f"The weight of {name!r} is {weight.dtype}; gradients need a floating-point base model."
                )
            weight.grad = None
            weight.requires_grad_(True)
        for group in owners.values():
            handles.append(
                weights[group[0]].register_post_accumulate_grad_hook(partial(_accumulate, [sums[n] for n in group]))
            )
        model.train()
        rng_devices = (
            [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        )
        with torch.enable_grad(), torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(0)
            for index, batch in enumerate(batches):
                outputs = model(**to_device(batch, device))
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
        for parameter, flag in zip(parameters, flags, strict=True):
            parameter.requires_grad_(flag)
        for name, weight in weights.items():
            weight.grad = saved_grads[name]
        model.train(was_training)
    # A Conv1D stores its weight (and so its gradient) in × out: return every gradient as (out, in), like W0.
    return {name: to_layout(model.get_submodule(name), total) for name, total in sums.items()}


def input_covariances(
    model: nn.Module, batches: Sequence[Mapping[str, Any]], target_names: Iterable[str]
) -> dict[str, torch.Tensor]:
    """Per target module, the fp32 second moment `Σ x·xᵀ` `(in, in)` of its inputs over all non-padding tokens,
    collected with forward hooks in eval mode without gradients (activation statistics for activation-based
    inits such as CorDA / CNTLoRA). Memory: one `(in, in)` fp32 matrix per module, on the CPU.

    Tokens whose `attention_mask` is 0 are left out when the module input is `(batch, seq, in)` like the
    mask; the returned dict also has `"__tokens__"`, the number of tokens counted.

    Example:
        >>> batches = calibration_set(rows, samples=8).batches                                # doctest: +SKIP
        >>> cov = input_covariances(model, batches, ["model.layers.0.mlp.down_proj"])          # doctest: +SKIP
    """
    names = list(target_names)
    sums: dict[str, torch.Tensor | None] = dict.fromkeys(names)
    state: dict[str, Any] = {"mask": None, "tokens": 0}
    was_training = model.training
    device = input_device(model)

    def hook(name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        x = x.detach().float()
        mask = state["mask"]
        if mask is not None and x.ndim == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
            x = x[mask.to(x.device).bool()]
        x = x.reshape(-1, x.shape[-1])
        moment = (x.T @ x).cpu()
        total = sums[name]
        sums[name] = moment if total is None else total.add_(moment)
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
                model(**{k: v for k, v in to_device(batch, device).items() if k != "labels"})
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    result = {name: total for name, total in sums.items() if total is not None}
    result["__tokens__"] = torch.tensor(state["tokens"])
    return result


# ---------------------------------------------------------------------------------------------------- helpers


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: its input embeddings' device, else its first parameter's."""
    get_input_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_input_embeddings() if get_input_embeddings is not None else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def to_device(batch: Mapping[str, Any], device: torch.device) -> Batch:
    """`batch` with every tensor moved to `device`."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _accumulate(totals: list[torch.Tensor], weight: torch.Tensor) -> None:
    # A post-accumulate-grad hook runs right after autograd has written `weight.grad`.
    gradient = cast(torch.Tensor, weight.grad).detach().float().to("cpu")
    for total in totals:
        total.add_(gradient)
    weight.grad = None  # freed as soon as it is summed: no gradient outlives its backward pass
