"""IniLoRA: fit s·B·A ≈ W0 (mean squared error), then freeze the residual W0 − s·B·A.

Faithful to the authors' code (see the README's variant table): zero-mean N(0, σ̄²) starts with σ̄ the mean
of the per-matrix standard deviations over the layers of one module type, Adam(lr 5e-4, eps 1e-8),
StepLR(5000, 0.9) stepped before the optimizer, 20 000 full-matrix steps, fp32. All same-shape matrices are
fitted as one batch; each keeps its own mean loss, so the updates equal fitting them one by one.

With scaling s ≠ 1 the unscaled product is fitted to W0 / s (σ̄ is measured on W0 / s too), so that s·B·A ≈ W0
and the residual stays the small approximation error.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from transformers.utils.logging import tqdm

from inilora_hf.linalg.fit import adam_fit, randomized_svd_factors
from inilora_hf.linalg.grouping import stack

from ..log import get_logger
from .citations import INILORA
from .inputs import VariantInputs
from .random import draw_factors
from .registry import ModuleFactors, register_variant, require
from .svd import singular_factors

logger = get_logger(__name__)

SOLVERS = ("adam", "svd", "rsvd")
SMALL_FIT_ELEMENTS = 1 << 20


def module_type(name: str) -> str:
    """The module type used to pool σ̄ across layers: the last path component (`q_proj`, `v_proj`, ...)."""
    return name.rsplit(".", 1)[-1]


def mean_by_type(stds: dict[str, float]) -> dict[str, float]:
    """σ̄ per module type from per-matrix stds: the mean over the layers of that type (paper eq. 2)."""
    pooled: dict[str, list[float]] = {}
    for name, std in stds.items():
        pooled.setdefault(module_type(name), []).append(std)
    return {kind: sum(values) / len(values) for kind, values in pooled.items()}


def mean_std_by_type(weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """σ̄ per module type: the mean over layers of each matrix's (unbiased) standard deviation (paper eq. 1-2)."""
    return mean_by_type({name: weight.float().std().item() for name, weight in weights.items()})


@contextmanager
def few_threads_for_small_work(weights: Mapping[str, torch.Tensor], device: torch.device) -> Iterator[None]:
    """Run small CPU fits on one thread: their per-step work is too small to split, and OpenMP synchronisation
    made the demo's 20 000-step fit 40× slower with 2 threads on a busy 2-core machine (3.5 s vs 154 s)."""
    total = sum(w.numel() for w in weights.values())
    if device.type != "cpu" or total >= SMALL_FIT_ELEMENTS:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def fp32_matmuls(tf32: bool) -> Iterator[None]:
    """fp32 matmuls at full IEEE precision during the fit unless `tf32=True`, whatever the caller set globally
    (training scripts often enable TF32, which rounds the products to a 10-bit mantissa on Ampere and later
    GPUs and changes the Adam trajectory); the previous setting is restored afterwards.

    Example:
        >>> with fp32_matmuls(tf32=False):
        ...     torch.get_float32_matmul_precision()
        'highest'
    """
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def randomized_factors(inputs: VariantInputs, targets: dict[str, torch.Tensor]) -> dict[str, ModuleFactors]:
    """The optimum by randomized SVD (8 power iterations, 8 extra sketch columns; ≤ 1.001 × the optimal MSE on
    the measured weights), much faster than a full SVD on large matrices; seeded by the `seed` option."""
    generator = torch.Generator(device=inputs.device).manual_seed(inputs.config.options["seed"])
    factors = {}
    for rank, names in inputs.rank_groups(targets):
        lora_B, lora_A = randomized_svd_factors(stack(targets, names, device=inputs.device), rank, generator=generator)
        factors.update({n: ModuleFactors(lora_A[i].cpu(), lora_B[i].cpu()) for i, n in enumerate(names)})
    return factors


def _check(options: dict) -> None:
    require(isinstance(options["seed"], int), f"`seed` must be an integer, got {options['seed']!r}.")
    require(
        isinstance(options["steps"], int) and options["steps"] >= 0,
        f"`steps` must be a non-negative integer, got {options['steps']!r}.",
    )
    for key in ("lr", "eps", "gamma"):
        require(
            isinstance(options[key], (int, float)) and options[key] > 0,
            f"`{key}` must be positive, got {options[key]!r}.",
        )
    require(
        isinstance(options["step_size"], int) and options["step_size"] > 0,
        f"`step_size` must be a positive integer, got {options['step_size']!r}.",
    )
    require(
        options["tol"] is None or (isinstance(options["tol"], (int, float)) and options["tol"] > 0),
        f"`tol` must be None (run every step) or a positive number, got {options['tol']!r}.",
    )
    require(
        options["sigma"] is None or (isinstance(options["sigma"], (int, float)) and options["sigma"] > 0),
        f"`sigma` must be None (σ̄ from the weights) or a positive number, got {options['sigma']!r}.",
    )
    require(options["solver"] in SOLVERS, f"`solver` must be one of {SOLVERS}, got {options['solver']!r}.")
    require(isinstance(options["tf32"], bool), f"`tf32` must be True or False, got {options['tf32']!r}.")


@register_variant(
    "inilora",
    residual=True,
    defaults={
        "seed": 0,
        "steps": 20_000,
        "lr": 5e-4,
        "eps": 1e-8,
        "step_size": 5000,
        "gamma": 0.9,
        "tol": None,
        "sigma": None,
        "solver": "adam",
        "tf32": False,
    },
    check=_check,
    description="IniLoRA: Adam fit of s·B·A ≈ W0 from N(0, σ̄²); base weight becomes the residual W0 − s·B·A.",
    citation=INILORA,
    approximates_weight=True,
)
def inilora(inputs: VariantInputs) -> dict[str, ModuleFactors]:
    """Fit every target matrix (batched by shape); `solver="svd"` returns the exact optimum instead. Matmuls run
    in full fp32 unless the `tf32=True` option allows TensorFloat-32 (GPU only; faster, not the same factors)."""
    with fp32_matmuls(inputs.config.options["tf32"]):
        return _inilora(inputs)


def _inilora(inputs: VariantInputs) -> dict[str, ModuleFactors]:
    options = inputs.config.options
    targets = {name: weight.float() / inputs.config.scaling_for(name) for name, weight in inputs.weights.items()}
    groups = [names for _, names in inputs.rank_groups(targets)]

    if options["solver"] == "svd":
        return singular_factors(inputs, smallest=False)
    if options["solver"] == "rsvd":
        return randomized_factors(inputs, targets)

    sigmas = None
    if options["sigma"] is None:
        sigmas = inputs.std_by_type if inputs.std_by_type is not None else mean_std_by_type(targets)
    logger.info("IniLoRA init std σ̄ per module type: %s", sigmas or options["sigma"])

    def fill(name: str, lora_A: torch.Tensor, lora_B: torch.Tensor, generator: torch.Generator) -> None:
        std = options["sigma"] if sigmas is None else sigmas[module_type(name)]
        # The reference draws the (out, r) factor first.
        lora_B.normal_(0.0, std, generator=generator)
        lora_A.normal_(0.0, std, generator=generator)

    starts = draw_factors(inputs, fill)
    factors = {}
    steps = options["steps"]
    # One bar counts the steps of every shape group; its label says so, so that the total agrees with `steps`.
    label = (
        f"IniLoRA fit: {len(groups)} shape groups × {steps} steps" if len(groups) > 1 else f"IniLoRA fit: {steps} steps"
    )
    with (
        few_threads_for_small_work(inputs.weights, inputs.device),
        tqdm(total=steps * len(groups), desc=label, unit="step", disable=steps == 0) as progress,
    ):
        for names in groups:
            result = adam_fit(
                stack(targets, names, device=inputs.device),
                torch.stack([starts[n].lora_B for n in names]).to(inputs.device),
                torch.stack([starts[n].lora_A for n in names]).to(inputs.device),
                steps=options["steps"],
                lr=options["lr"],
                eps=options["eps"],
                step_size=options["step_size"],
                gamma=options["gamma"],
                tol=options["tol"],
                progress=progress,
            )
            if result.steps_run < options["steps"]:
                logger.info(
                    "IniLoRA fit of %s stopped early at step %d (tol=%s).", names, result.steps_run, options["tol"]
                )
            factors.update({n: ModuleFactors(result.A[i].cpu(), result.B[i].cpu()) for i, n in enumerate(names)})
    return factors
