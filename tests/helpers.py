"""Helpers shared by test modules: a few plain training steps, logits, fp32 rounding bounds, reloading exports
in a process that never imports inilora_hf, and 2-process `torchrun` launches."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft.tuners.lora import LoraLayer
from transformers import Trainer, TrainingArguments
from trl import SFTConfig

from inilora_hf import convert

RELOAD_SCRIPT = r"""
import json, sys
import peft, torch, transformers
from peft import PeftModel

spec = json.loads(sys.argv[1])
auto_model, auto_peft_model = getattr(transformers, spec["auto_model"]), getattr(peft, spec["auto_peft_model"])
ids = torch.tensor(spec["input_ids"])
reference = torch.load(spec["logits"])
with torch.no_grad():
    merged = auto_model.from_pretrained(spec["merged"])
    lora = PeftModel.from_pretrained(auto_model.from_pretrained(spec["base"]), spec["lora"])
    auto_lora = auto_peft_model.from_pretrained(spec["lora"])  # the base recorded in adapter_config.json
    result = {"merged": (merged(input_ids=ids).logits - reference).abs().max().item(),
              "lora": (lora(input_ids=ids).logits - reference).abs().max().item(),
              "auto_lora": (auto_lora(input_ids=ids).logits - reference).abs().max().item(),
              "auto_lora_class": type(auto_lora).__name__,
              "r": lora.peft_config["default"].r,
              "inilora_hf_imported": "inilora_hf" in sys.modules}
print(json.dumps(result))
"""


def train_a_few_steps(model: torch.nn.Module, steps: int = 2, lr: float = 1e-2) -> None:
    """Plain Adam steps on a fixed batch: large enough that every trainable tensor moves visibly."""
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def logits_of(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits without gradients."""
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


FP32_UNIT_ROUNDOFF = 2.0**-24  # u: round-to-nearest fp32 gives |fl(x) − x| ≤ u·|x|


def fp32_gamma(n: int) -> float:
    """Higham's γ_n = n·u / (1 − n·u): the relative error bound of n chained fp32 roundings, e.g. of a length-n dot
    product against Σ|x_i·y_i|."""
    return n * FP32_UNIT_ROUNDOFF / (1 - n * FP32_UNIT_ROUNDOFF)


def sgd_step_with_magnitudes(
    model: torch.nn.Module, ids: torch.Tensor, learning_rate: float
) -> tuple[dict[str, torch.Tensor], int]:
    """One SGD step of `model` on the batch `ids` (the ids are the labels); returns, per LoRA weight,
    Σ_t |∂L/∂y_t| |x_t|ᵀ (float64: the magnitude its gradient's sum over tokens is rounded against) and the number
    of tokens summed."""
    inputs: dict[str, torch.Tensor] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    handles = []
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        for part in ("lora_A", "lora_B"):
            key = f"{name}.{part}.default.weight"
            linear = getattr(layer, part)["default"]

            def keep_input(_module, args, _output, key=key) -> None:
                inputs[key] = args[0].detach().reshape(-1, args[0].shape[-1]).double()

            def magnitude(_module, _grad_input, grad_output, key=key) -> None:
                grad = grad_output[0].detach().reshape(-1, grad_output[0].shape[-1]).double()
                magnitudes[key] = grad.abs().mT @ inputs[key].abs()

            handles += [linear.register_forward_hook(keep_input), linear.register_full_backward_hook(magnitude)]
    model(input_ids=ids, labels=ids).loss.backward()
    for handle in handles:
        handle.remove()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=learning_rate).step()
    return magnitudes, ids.numel()


def sgd_step_tolerance(
    learning_rate: float, tokens: int, magnitude: torch.Tensor, expected: torch.Tensor
) -> torch.Tensor:
    """How far one SGD step split across ranks may land from the same step in one process, per element: the
    gradient is a sum over the batch's `tokens`; one process sums all of them, the ranks part each and the
    trainer averages the parts. Each order is within γ_n·Σ_t|g_t| (`magnitude`) of the exact sum, SGD scales by the
    learning rate, and the update p − lr·g is rounded once on each side (2u·|p|)."""
    return (
        learning_rate * 2 * fp32_gamma(tokens) * magnitude + 2 * FP32_UNIT_ROUNDOFF * expected.detach().double().abs()
    )


def svd_backward_error(singular_values: np.ndarray, shape: tuple[int, ...]) -> float:
    """The spectral-norm backward error of an fp32 SVD of an `(m, n)` matrix: γ_max(m,n)·σ_1 (LAPACK's SVD is backward
    stable); by Weyl it also bounds how far each computed singular value, and ‖UᵀU − I‖·σ_1, can be off."""
    return fp32_gamma(max(shape[-2:])) * float(np.max(singular_values))


def truncated_svd_tolerance(
    singular_values: np.ndarray, shape: tuple[int, ...], rank: int, *, smallest: bool = False
) -> float:
    """Max |Δ| between an fp32 rank-`rank` truncated SVD product (top or, with `smallest`, bottom triplets) and the
    exact one: E·(1 + 2σ/(δ − E)), with E the backward error, δ the gap between the kept and the dropped singular
    values and σ the largest kept one (Wedin: the kept singular subspaces turn by at most E/(δ − E)).

    Example:
        >>> round(truncated_svd_tolerance(np.array([3.0, 2.0, 1.0]), (3, 3), 1) / FP32_UNIT_ROUNDOFF)  # E ≈ 9u, δ = 1
        63
    """
    values = np.sort(np.asarray(singular_values, dtype=np.float64))[::-1]
    kept, dropped = (values[-rank:], values[:-rank]) if smallest else (values[:rank], values[rank:])
    error = svd_backward_error(values, shape)
    if dropped.size == 0:
        return error
    gap = dropped.min() - kept.max() if smallest else kept.min() - dropped.max()
    assert gap > error, f"singular value gap {gap:.3g} is within fp32 rounding ({error:.3g}): the subspace is undefined"
    return float(error * (1 + 2 * kept.max() / (gap - error)))


def svd_factor_tolerance(singular_values: np.ndarray, shape: tuple[int, ...], rank: int) -> float:
    """Max |Δ| between the balanced top-`rank` factors `B = U_r·√S_r`, `A = √S_r·V_rᵀ` of two fp32 SVDs of one matrix.

    Each is the exact SVD of a matrix within E of it, so of matrices 2E apart: a kept singular vector turns by at
    most 2E/(δ_j − 2E) (Wedin; δ_j is its singular value's distance to the others, 0 included for a non-square
    matrix), which moves its entries by at most √2 times that, and √σ_j moves by at most E/√σ_j.

    Example:
        >>> svd_factor_tolerance(np.array([3.0, 2.0, 1.0]), (3, 3), 1) < 1e-5
        True
    """
    values = np.sort(np.asarray(singular_values, dtype=np.float64))[::-1]
    error = svd_backward_error(values, shape)
    spectrum = np.append(values, 0.0) if shape[-2] != shape[-1] else values
    worst = 0.0
    for j in range(rank):
        gap = np.min(np.abs(np.delete(spectrum, j) - values[j]))
        assert gap > 2 * error, (
            f"singular value gap {gap:.3g} is within fp32 rounding ({error:.3g}): vectors are undefined"
        )
        sigma = values[j]
        worst = max(worst, math.sqrt(2 * sigma) * 2 * error / (gap - 2 * error) + error / math.sqrt(sigma))
    return float(worst)


def factor_mse_rounding(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Per matrix of a `(L, m, n)` stack, how far `inilora_hf.linalg.fit.factor_mse` may be off in fp32: ‖W‖² sums m·n
    squares, ⟨BᵀW, A⟩ and ⟨BᵀB, AAᵀ⟩ sum m and n products, with |⟨|B|ᵀ|W|, |A|⟩| ≤ ‖W‖_F·‖|B|·|A|‖_F and
    ⟨|B|ᵀ|B|, |A|·|A|ᵀ⟩ = ‖|B|·|A|‖_F²; plus the rounding of the fp32 result.

    Example:
        >>> W, B, A = torch.ones(1, 4, 4), torch.ones(1, 4, 1), torch.ones(1, 1, 4)
        >>> round(float(factor_mse_rounding(W, B, A)[0]) / FP32_UNIT_ROUNDOFF)
        36
    """
    m, n = W.shape[-2:]
    w = W.double().norm(dim=(1, 2))
    p = (B.double().abs() @ A.double().abs()).norm(dim=(1, 2))
    terms = fp32_gamma(m * n) * w**2 + 2 * fp32_gamma(m) * w * p + (fp32_gamma(m) + fp32_gamma(n)) * p**2
    return (terms + fp32_gamma(1) * (w + p) ** 2) / (m * n)


def adam_drift_bound(
    steps: int,
    lr: float,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    step_size: int = 5000,
    gamma: float = 0.9,
    accumulation: int,
) -> float:
    """How far (per parameter, absolute) two fp32 runs of the same full-batch Adam + StepLR fit may drift apart when
    their gradients differ only by rounding, each within γ_accumulation of the exact one (no cancellation assumed).

    Adam's step is lr_t·m̂/√v̂, and by Cauchy–Schwarz |m̂_t|/√v̂_t ≤ K = max_t (1−β1)/(1−β1^t)·√(Σ_{k<t}(β1²/β2)^k)
    ·√((1−β2^t)/(1−β2)) (7.3 for the defaults; the same holds with |g|), so a relative gradient error ε moves a step
    by at most lr_t·2Kε/(1−ε). Summed over the lr schedule, for each of the two runs against the exact one; first
    order: the drift's own feedback through the loss curvature is neglected.

    Example:
        >>> adam_drift_bound(300, 5e-4, step_size=100, accumulation=55) < 1e-5
        True
    """
    beta1, beta2 = betas
    ratio, partial, worst = beta1**2 / beta2, 0.0, 0.0
    for t in range(1, steps + 1):
        partial += ratio ** (t - 1)
        worst = max(worst, (1 - beta1) / (1 - beta1**t) * math.sqrt(partial * (1 - beta2**t) / (1 - beta2)))
    eps = fp32_gamma(accumulation)
    total_lr = sum(lr * gamma ** ((i + 1) // step_size) for i in range(steps))  # StepLR stepped before each step
    return 2 * total_lr * 2 * worst * eps / (1 - eps)


def llama_forward_roundings(config: Any, seq_len: int, lora_rank: int = 0) -> int:
    """fp32 roundings along the longest dependency chain of one Llama forward pass to a logit.

    Per decoder layer: two RMSNorms (a sum over `hidden_size`, then 4 elementwise steps), the q/k/v and gate/up
    contractions over `hidden_size`, the scores over `head_dim`, softmax and attention·V over the sequence, o_proj
    over heads·`head_dim`, down over `intermediate_size`; a LoRA branch adds `r + 2` to each projection
    (x·Aᵀ, then ·Bᵀ, then the sum); 12 elementwise steps (RoPE, score scale, exp, max, SiLU, gate product, the two
    residual adds). Then the final RMSNorm and lm_head over `hidden_size`.
    """
    hidden, head_dim = (
        config.hidden_size,
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
    )
    branch = lora_rank + 2 if lora_rank else 0
    norm = hidden + 4
    per_layer = (
        2 * norm
        + (hidden + branch)
        + (head_dim + 1)
        + 2 * seq_len
        + (config.num_attention_heads * head_dim + branch)
        + (hidden + branch)
        + (config.intermediate_size + branch)
        + 12
    )
    return config.num_hidden_layers * per_layer + norm + hidden


def fp32_logits_tolerance(reference: Any, input_ids: torch.Tensor, lora_rank: int = 0) -> float:
    """The largest |Δlogits| two fp32 forwards of the same math may show when they order their operations differently
    (a merged weight vs base + LoRA branch, another BLAS blocking): 2·γ_n·max_j Σ_i |h_i|·|W_ji|, with `n` from
    `llama_forward_roundings`, `h` the reference's final normalised hidden state and `W` its lm_head. That sum is the
    scale of Higham's dot-product bound for the logits; earlier rounding reaches them as a relative error of `h`
    (RMSNorm is scale-invariant), so it is counted in `n` at the same scale; 2: each forward may be off by that much.

    Example:
        >>> tolerance = fp32_logits_tolerance(plain_fp32_model, input_ids, lora_rank=8)   # doctest: +SKIP
    """
    with torch.no_grad():
        hidden = reference.base_model(input_ids=input_ids).last_hidden_state.float()
        scale = (hidden.abs() @ reference.get_output_embeddings().weight.float().abs().T).max().item()
    roundings = llama_forward_roundings(reference.config, input_ids.shape[-1], lora_rank)
    return 2 * fp32_gamma(roundings) * scale


def reload_exports_without_inilora(
    base: Path | str,
    merged: Path,
    lora: Path,
    input_ids: torch.Tensor,
    logits: torch.Tensor,
    work: Path,
    *,
    cwd: Path | None = None,
    auto_classes: tuple[str, str] = ("AutoModelForCausalLM", "AutoPeftModelForCausalLM"),
) -> dict:
    """Load `merged` with plain transformers, `lora` with plain peft on `base` (a directory or Hub id) and `lora`
    alone with the `auto_classes[1]` class of peft, in a fresh process started in `cwd`; return the max |Δlogits|
    of each against `logits`, the adapter's rank, and whether inilora_hf got imported."""
    torch.save(logits, work / "reference-logits.pt")
    spec = {
        "base": str(base),
        "merged": str(merged),
        "lora": str(lora),
        "logits": str(work / "reference-logits.pt"),
        "input_ids": input_ids.tolist(),
        "auto_model": auto_classes[0],
        "auto_peft_model": auto_classes[1],
    }
    run = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, json.dumps(spec)], capture_output=True, text=True, timeout=300, cwd=cwd
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


REPO_ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_TIMEOUT_S = 300


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now (for torchrun's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a CPU/gloo torchrun test: this checkout importable, one thread per rank, offline."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "TORCHELASTIC_ERROR_FILE": str(tmp_path / "error.json"),
    }


def torchrun(
    *args: str, env: dict[str, str], nproc: int = 2, timeout_s: float = TORCHRUN_TIMEOUT_S
) -> subprocess.CompletedProcess:
    """Run `torchrun --nproc_per_node=nproc ARGS` (a script, or `--module name ...`) in its own process group,
    killed as a whole if it outlives `timeout_s`; stdout and stderr together in `.stdout`."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *args,
    ]
    process = subprocess.Popen(
        command,
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"torchrun did not finish within {timeout_s} s:\n{output[-6000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, output, "")


def make_trainer(init: Any, output_dir: Path, callbacks: list | None = None) -> Trainer:
    """A `transformers.Trainer` over 16 random token rows of a tiny causal LM: 4 steps, a checkpoint every 2, the loss
    logged at every step."""
    rows = torch.randint(0, 128, (16, 12), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(
        str(output_dir),
        max_steps=4,
        save_steps=2,
        logging_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        seed=0,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    dataset = [{"input_ids": r, "labels": r} for r in rows]
    return Trainer(model_init=init, args=args, train_dataset=dataset, callbacks=callbacks)


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every LoRA tensor (`lora_` in the name) of `model`'s state dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def assert_same_lora_state(model: torch.nn.Module, other: torch.nn.Module) -> None:
    """Every LoRA tensor of the two models is bit-identical (e.g. a run and its resume)."""
    straight, resumed = lora_state(model), lora_state(other)
    assert sorted(straight) == sorted(resumed)
    for key, tensor in straight.items():
        assert torch.equal(tensor, resumed[key]), key


def train_export_resume(make_init: Callable[[], Any], base_dir: Path, root: Path, input_ids: torch.Tensor) -> dict:
    """A 4-step Trainer run of a fresh `make_init()` in `root/first` (checkpoint every 2), both exports reloaded in a
    process that never imports inilora_hf, and a resume of another fresh init from checkpoint-2 in `root/second`."""
    trainer = make_trainer(make_init(), root / "first")
    trainer.train()
    trainer.model.eval()
    trained_logits = logits_of(trainer.model, input_ids)
    convert.to_merged(trainer.model, root / "merged")
    convert.to_lora(trainer.model, root / "lora")
    reload = reload_exports_without_inilora(
        base_dir, root / "merged", root / "lora", input_ids, trained_logits, root, cwd=root
    )
    resumed = make_trainer(make_init(), root / "second")
    shutil.copytree(root / "first" / "checkpoint-2", root / "second" / "checkpoint-2")
    resumed.train(resume_from_checkpoint=str(root / "second" / "checkpoint-2"))
    return {"trainer": trainer, "trained_logits": trained_logits, "reload": reload, "resumed": resumed}


def sft_args(output_dir: Path, **overrides: Any) -> SFTConfig:
    """The suite's short SFT run on CPU: 2 steps, batch 8, lr 1e-2, fp32, loss logged at every step, no saving."""
    defaults: dict[str, Any] = {
        "max_steps": 2,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "bf16": False,
        "gradient_checkpointing": False,
        "use_cpu": True,
        "disable_tqdm": True,
    }
    return SFTConfig(output_dir=str(output_dir), **{**defaults, **overrides})
