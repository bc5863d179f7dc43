"""Tests for the IniLoRA fitting kernels in ``inilora_hf.linalg.fit``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.reference import reference_fit
from inilora_hf.linalg.fit import adam_fit, factor_mse, optimal_mse, randomized_svd_factors, svd_factors
from tests.helpers import (
    adam_drift_bound,
    factor_mse_rounding,
    fp32_gamma,
    svd_backward_error,
    truncated_svd_tolerance,
)


def _problem(shape: tuple[int, int, int], rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets N(0, 0.02²) and IniLoRA-style initial factors N(0, σ̄²), σ̄ = mean std of the targets."""
    generator = torch.Generator().manual_seed(seed)
    L, m, n = shape
    W = 0.02 * torch.randn(L, m, n, generator=generator)
    sigma = W.std(dim=(1, 2)).mean().item()
    B0 = sigma * torch.randn(L, m, rank, generator=generator)
    A0 = sigma * torch.randn(L, rank, n, generator=generator)
    return W, B0, A0


class _Counter:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def update(self, n: int) -> None:
        self.calls.append(n)


def test_adam_fit_matches_per_matrix_torch_adam_with_steplr() -> None:
    W, B0, A0 = _problem((3, 48, 32), rank=4)
    # step_size=100 puts lr decays at i = 99, 199 and 299 inside the 300 steps.
    kwargs = dict(lr=5e-4, betas=(0.9, 0.999), eps=1e-8, step_size=100, gamma=0.9)
    result = adam_fit(W, B0, A0, steps=300, **kwargs)
    reference = [reference_fit(W[l], B0[l], A0[l], 300, **kwargs) for l in range(3)]
    ref_B, ref_A = torch.stack([B for B, _, _ in reference]), torch.stack([A for _, A, _ in reference])
    # Closed-form and autograd gradients differ only by rounding, each within γ of its longest sum (m + r + 3).
    drift = adam_drift_bound(300, 5e-4, step_size=100, gamma=0.9, accumulation=48 + 4 + 3)
    assert (result.B - ref_B).abs().max() <= drift and (result.A - ref_A).abs().max() <= drift
    # Hence |Δ(BA)_ij| ≤ d·(Σ_k|A_kj| + Σ_k|B_ik|) + r·d², which bounds the change of the RMSE (a Frobenius norm /
    # √(m·n)); each loss also rounds its m·n squares: |Δmse| ≤ γ_mn·(‖W‖ + ‖BA‖)²/(m·n) per loss.
    ref_final = torch.stack([((B @ A - W[l]) ** 2).mean() for l, (B, A, _) in enumerate(reference)])
    product = drift * (ref_A.abs().sum(1).amax(1) + ref_B.abs().sum(2).amax(1)) + 4 * drift**2
    rounding = 2 * fp32_gamma(48 * 32) * (W.norm(dim=(1, 2)) + (ref_B @ ref_A).norm(dim=(1, 2))) ** 2 / (48 * 32)
    assert ((result.mse.sqrt() - ref_final.sqrt()).abs() <= product + rounding / ref_final.sqrt()).all()
    assert result.steps_run == 300


def test_adam_fit_leaves_inputs_untouched() -> None:
    W, B0, A0 = _problem((2, 16, 12), rank=3)
    copies = [t.clone() for t in (W, B0, A0)]
    adam_fit(W, B0, A0, steps=5)
    for before, after in zip(copies, (W, B0, A0), strict=True):
        assert torch.equal(before, after)


def test_adam_fit_is_batching_invariant() -> None:
    W, B0, A0 = _problem((3, 48, 32), rank=4, seed=1)
    stacked = adam_fit(W, B0, A0, steps=300, step_size=100)
    alone = [adam_fit(W[l : l + 1], B0[l : l + 1], A0[l : l + 1], steps=300, step_size=100) for l in range(3)]
    # The same operations per matrix: only a BLAS that blocks a batch differently may round differently.
    drift = adam_drift_bound(300, 5e-4, step_size=100, accumulation=48 + 4 + 3)
    torch.testing.assert_close(stacked.B, torch.cat([r.B for r in alone]), rtol=0, atol=drift)
    torch.testing.assert_close(stacked.A, torch.cat([r.A for r in alone]), rtol=0, atol=drift)


def test_adam_fit_rejects_mismatched_factors() -> None:
    W, B0, A0 = _problem((2, 16, 12), rank=3)
    with pytest.raises(ValueError):
        adam_fit(W, B0, A0.mT, steps=1)


def _numpy_truncated(W: torch.Tensor, rank: int, smallest: bool = False) -> np.ndarray:
    U, S, Vh = np.linalg.svd(W.double().numpy(), full_matrices=False)
    keep = slice(-rank, None) if smallest else slice(0, rank)
    return np.einsum("lik,lk,lkj->lij", U[:, :, keep], S[:, keep], Vh[:, keep, :])


@pytest.mark.parametrize("smallest", [False, True])
def test_svd_factors_reconstruct_truncated_svd_balanced(smallest: bool) -> None:
    W, _, _ = _problem((3, 40, 24), rank=1)
    B, A = svd_factors(W, 5, smallest=smallest)
    assert B.shape == (3, 40, 5) and A.shape == (3, 5, 24) and B.dtype == A.dtype == torch.float32
    expected = torch.from_numpy(_numpy_truncated(W, 5, smallest))
    S = np.linalg.svd(W.double().numpy(), compute_uv=False)
    for l in range(3):
        tolerance = truncated_svd_tolerance(S[l], W.shape, 5, smallest=smallest)
        torch.testing.assert_close(B[l].double() @ A[l].double(), expected[l], rtol=0, atol=tolerance)
        # BᵀB = √S·UᵀU·√S: U is orthonormal to γ_m, √S rounds, S is within E (Weyl): at most 3E off diag(S).
        S_kept = torch.from_numpy(S[l, -5:] if smallest else S[l, :5])
        balance = 3 * svd_backward_error(S[l], W.shape)
        torch.testing.assert_close(B[l].double().mT @ B[l].double(), torch.diag(S_kept), rtol=0, atol=balance)
        torch.testing.assert_close(A[l].double() @ A[l].double().mT, torch.diag(S_kept), rtol=0, atol=balance)


def test_factor_mse_matches_direct_mse() -> None:
    W, B, A = _problem((3, 40, 24), rank=6)
    B, A = 3 * B, 3 * A  # make BA comparable to W so all three trace terms matter
    direct = ((B.double() @ A.double() - W.double()) ** 2).mean((1, 2))
    assert ((factor_mse(W, B, A).double() - direct).abs() <= factor_mse_rounding(W, B, A)).all()


def test_optimal_mse_is_mse_of_truncated_svd() -> None:
    W, _, _ = _problem((3, 40, 24), rank=1)
    m, n = W.shape[1:]
    expected = torch.from_numpy(((_numpy_truncated(W, 7) - W.double().numpy()) ** 2).mean((1, 2)))
    S = np.linalg.svd(W.double().numpy(), compute_uv=False)
    # Σ_{i>r} σ_i² / (m·n) from fp32 singular values, each within E of the exact one (Weyl), then cast to fp32.
    errors = [svd_backward_error(S[l], W.shape) for l in range(3)]
    optimal_tolerance = torch.tensor([((2 * S[l, 7:] + e) * e).sum() / (m * n) for l, e in enumerate(errors)])
    assert ((optimal_mse(W, 7).double() - expected).abs() <= optimal_tolerance + fp32_gamma(1) * expected).all()
    B, A = svd_factors(W, 7)
    # ‖W − W̃_r‖² − ‖W − W_r‖² ≤ 2‖W − W_r‖_F·‖Δ‖_F + ‖Δ‖_F², ‖Δ‖_F ≤ √(mn)·(the truncated-SVD bound); then rounding.
    delta = torch.tensor([math.sqrt(m * n) * truncated_svd_tolerance(S[l], W.shape, 7) for l in range(3)])
    reconstruction = (2 * (expected * m * n).sqrt() * delta + delta**2) / (m * n)
    assert ((factor_mse(W, B, A).double() - expected).abs() <= reconstruction + factor_mse_rounding(W, B, A)).all()


def test_randomized_svd_factors_reach_the_optimum() -> None:
    W, _, _ = _problem((3, 64, 48), rank=1)
    B, A = randomized_svd_factors(W, 8, generator=torch.Generator().manual_seed(0))
    assert B.shape == (3, 64, 8) and A.shape == (3, 8, 48)
    assert (factor_mse(W, B, A) <= 1.001 * optimal_mse(W, 8)).all()
    # BᵀB = √S·UᵀQᵀQU·√S and AAᵀ = √S·VᵀV·√S with Q, U, V orthonormal to γ_m, γ_w, γ_n and √S rounded: both within
    # (γ_m + 2γ_w + γ_n + 4u)·σ_1 ≤ 4E of diag(S).
    S = np.linalg.svd(W.double().numpy(), compute_uv=False)
    for l in range(3):
        balance = 4 * svd_backward_error(S[l], W.shape)
        torch.testing.assert_close(
            B[l].double().mT @ B[l].double(), A[l].double() @ A[l].double().mT, rtol=0, atol=balance
        )


@pytest.mark.parametrize("shape", [(2, 64, 64), (2, 32, 64)], ids=["q_proj", "v_proj"])
def test_adam_fit_defaults_reach_optimum_on_tiny_llama_shapes(shape: tuple[int, int, int]) -> None:
    # 20 000 default steps. Measured 1.5–2.5 s per call (single thread, 2-core CPU under a load of ~3);
    # MSE/optimal = 1.0000 for all four matrices.
    W, B0, A0 = _problem(shape, rank=8, seed=2)
    result = adam_fit(W, B0, A0)
    assert result.steps_run == 20000
    assert (result.mse <= 1.05 * optimal_mse(W, 8)).all()


def test_adam_fit_tol_stops_early_and_reports_steps() -> None:
    W, B0, A0 = _problem((3, 48, 32), rank=4, seed=3)
    progress = _Counter()
    early = adam_fit(W, B0, A0, steps=20000, tol=1e-3, check_every=100, progress=progress)
    # Measured: stops at step 600 of 20 000 with MSE/optimal = 1.014, 1.0005, 1.0006.
    assert 0 < early.steps_run < 20000 and early.steps_run % 100 == 0
    assert (early.mse <= 1.05 * optimal_mse(W, 4)).all()
    assert sum(progress.calls) == early.steps_run
    full = adam_fit(W, B0, A0, steps=early.steps_run + 50, check_every=100)
    assert full.steps_run == early.steps_run + 50
    # Stopping after k steps leaves exactly the factors of a plain k-step run.
    plain = adam_fit(W, B0, A0, steps=early.steps_run)
    assert torch.equal(early.B, plain.B) and torch.equal(early.A, plain.A)


def test_adam_fit_reports_progress_in_chunks() -> None:
    W, B0, A0 = _problem((1, 8, 8), rank=2)
    progress = _Counter()
    adam_fit(W, B0, A0, steps=1250, check_every=500, progress=progress)
    assert progress.calls == [500, 500, 250]
