"""Group same-shape matrices so that they can be processed as one batched tensor, within a memory bound."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch


def shape_groups(
    shapes: Mapping[str, tuple[int, ...]], *, max_bytes: int | None = None, bytes_per_element: int = 4
) -> Iterator[list[str]]:
    """Yield lists of names whose shapes are equal, each list's stacked size at most `max_bytes`.

    Names keep their sorted order inside a group, so results never depend on dict insertion order.

    Example:
        >>> list(shape_groups({"a": (4, 4), "b": (2, 4), "c": (4, 4)}))
        [['b'], ['a', 'c']]
    """
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name in sorted(shapes):
        by_shape.setdefault(tuple(shapes[name]), []).append(name)
    for shape in sorted(by_shape):
        names = by_shape[shape]
        numel = 1
        for dim in shape:
            numel *= dim
        per_group = len(names) if max_bytes is None else max(1, max_bytes // (numel * bytes_per_element))
        for start in range(0, len(names), per_group):
            yield names[start : start + per_group]


def stack(tensors: Mapping[str, torch.Tensor], names: list[str], *, device: torch.device | str = "cpu") -> torch.Tensor:
    """Stack `tensors[name]` for `names` into one fp32 `(len(names), ...)` tensor on `device`."""
    return torch.stack([tensors[name].to(device=device, dtype=torch.float32) for name in names])
