"""The IniLoRA authors' fitting loop, re-implemented for comparison (one matrix at a time).

Per iteration: ``zero_grad → loss = ((B @ A - W) ** 2).mean() → backward → scheduler.step() →
optimizer.step()`` with ``torch.optim.Adam`` and ``StepLR``, and ``loss.item()`` every step as in
their script. This is the yardstick for :func:`inilora_hf.linalg.fit.adam_fit`.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


def reference_fit(
    target_2d: Tensor,
    B0: Tensor,
    A0: Tensor,
    steps: int = 20000,
    *,
    lr: float = 5e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    step_size: int = 5000,
    gamma: float = 0.9,
) -> tuple[Tensor, Tensor, list[float]]:
    """Fit ``B @ A ≈ target_2d`` with autograd, ``torch.optim.Adam`` and ``StepLR`` (scheduler first).

    Args:
        target_2d: ``(m, n)`` matrix.
        B0: ``(m, r)`` initial factor (copied).
        A0: ``(r, n)`` initial factor (copied).
        steps: iterations.

    Returns:
        ``(B, A, losses)``: fitted factors (detached) and the loss before each step.

    Example:
        >>> W = torch.randn(6, 5)
        >>> B, A, losses = reference_fit(W, torch.randn(6, 2), torch.randn(2, 5), steps=10)
        >>> len(losses)
        10
    """
    W = target_2d.float()
    B = B0.detach().float().clone().requires_grad_(True)
    A = A0.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([B, A], lr=lr, betas=betas, eps=eps)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    losses = []
    with warnings.catch_warnings():
        # Stepping the scheduler before the optimizer is deliberate: it is what the authors do.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        for _ in range(steps):
            optimizer.zero_grad()
            loss = ((B @ A - W) ** 2).mean()
            loss.backward()
            scheduler.step()
            optimizer.step()
            losses.append(loss.item())
    return B.detach(), A.detach(), losses
