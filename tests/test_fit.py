"""Tests for the IniLoRA fitting kernels in ``inilora_hf.fit``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.reference import reference_fit
from inilora_hf.fit import adam_fit, factor_mse, optimal_mse, randomized_svd_factors, svd_factors


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
    ref_BA = torch.stack([B @ A for B, A, _ in reference])
    # Measured: max|ΔBA| = 1.1e-8 with max|BA| = 0.058, i.e. 1.9e-7 relative (closed-form vs autograd rounding).
    assert (result.B @ result.A - ref_BA).abs().max() <= 1e-6 * ref_BA.abs().max()
    ref_final = torch.stack([((B @ A - W[l]) ** 2).mean() for l, (B, A, _) in enumerate(reference)])
    torch.testing.assert_close(result.mse, ref_final, rtol=1e-5, atol=0)
    assert result.steps_run == 300


def test_adam_fit_leaves_inputs_untouched() -> None:
    W, B0, A0 = _problem((2, 16, 12), rank=3)
    copies = [t.clone() for t in (W, B0, A0)]
    adam_fit(W, B0, A0, steps=5)
    for before, after in zip(copies, (W, B0, A0)):
        assert torch.equal(before, after)


def test_adam_fit_is_batching_invariant() -> None:
    W, B0, A0 = _problem((3, 48, 32), rank=4, seed=1)
    stacked = adam_fit(W, B0, A0, steps=300, step_size=100)
    # Bitwise equal on this CPU (MKL); the tolerance only leaves room for other BLAS back ends.
    alone = [adam_fit(W[l : l + 1], B0[l : l + 1], A0[l : l + 1], steps=300, step_size=100) for l in range(3)]
    torch.testing.assert_close(stacked.B, torch.cat([r.B for r in alone]), rtol=0, atol=1e-9)
    torch.testing.assert_close(stacked.A, torch.cat([r.A for r in alone]), rtol=0, atol=1e-9)


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
    expected = torch.from_numpy(_numpy_truncated(W, 5, smallest)).float()
    torch.testing.assert_close(B @ A, expected, rtol=0, atol=1e-6)
    S = torch.from_numpy(np.linalg.svd(W.double().numpy(), compute_uv=False)).float()
    S_kept = S[:, -5:] if smallest else S[:, :5]
    torch.testing.assert_close(B.mT @ B, torch.diag_embed(S_kept), rtol=0, atol=1e-6)
    torch.testing.assert_close(A @ A.mT, torch.diag_embed(S_kept), rtol=0, atol=1e-6)


def test_factor_mse_matches_direct_mse() -> None:
    W, B, A = _problem((3, 40, 24), rank=6)
    B, A = 3 * B, 3 * A  # make BA comparable to W so all three trace terms matter
    direct = ((B @ A - W) ** 2).mean((1, 2))
    torch.testing.assert_close(factor_mse(W, B, A), direct, rtol=1e-5, atol=0)


def test_optimal_mse_is_mse_of_truncated_svd() -> None:
    W, _, _ = _problem((3, 40, 24), rank=1)
    expected = ((_numpy_truncated(W, 7) - W.double().numpy()) ** 2).mean((1, 2))
    torch.testing.assert_close(optimal_mse(W, 7), torch.from_numpy(expected).float(), rtol=1e-5, atol=0)
    B, A = svd_factors(W, 7)
    torch.testing.assert_close(factor_mse(W, B, A), optimal_mse(W, 7), rtol=1e-5, atol=0)


def test_randomized_svd_factors_reach_the_optimum() -> None:
    W, _, _ = _problem((3, 64, 48), rank=1)
    B, A = randomized_svd_factors(W, 8, generator=torch.Generator().manual_seed(0))
    assert B.shape == (3, 64, 8) and A.shape == (3, 8, 48)
    assert (factor_mse(W, B, A) <= 1.001 * optimal_mse(W, 8)).all()
    torch.testing.assert_close(B.mT @ B, A @ A.mT, rtol=0, atol=1e-6)


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
