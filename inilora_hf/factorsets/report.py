"""Fit statistics of a factor set and the per-module init report of a model built from it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from inilora_hf.linalg.fit import factor_mse, optimal_mse
from inilora_hf.linalg.grouping import shape_groups, stack
from inilora_hf.variants import ModuleFactors, get_variant
from inilora_hf.variants.config import InitConfig

NO_STATISTIC = "—"


def fit_statistics(
    weights: Mapping[str, torch.Tensor],
    factors: Mapping[str, ModuleFactors],
    config: InitConfig,
    *,
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, float]]:
    """For variants whose factors approximate W0 (inilora, pissa, milora), per module: `mse` =
    mean((s·B·A − W0)²), the rank-r SVD optimum `optimal_mse` and `mse_ratio`; `{}` for other variants, where
    s·B·A is not meant to approximate W0.

    Computed in fp32, batched by shape and rank, without forming the (out, in) error matrix.
    """
    if not get_variant(config.variant).approximates_weight:
        return {}
    stats: dict[str, dict[str, float]] = {}
    # Grouped by (rank, out, in): modules of one shape but different ranks (`rank_pattern`) are not stacked together.
    for names in shape_groups({n: (config.rank_for(n), *w.shape) for n, w in weights.items()}):
        target = stack(weights, names, device=device)
        lora_B = torch.stack([factors[n].lora_B.float() * config.scaling_for(n) for n in names]).to(device)
        lora_A = torch.stack([factors[n].lora_A.float() for n in names]).to(device)
        mse = factor_mse(target, lora_B, lora_A).cpu()
        optimum = optimal_mse(target, lora_A.shape[1]).cpu()
        for i, name in enumerate(names):
            ratio = float(mse[i] / optimum[i]) if optimum[i] > 0 else float("nan")
            stats[name] = {"mse": float(mse[i]), "optimal_mse": float(optimum[i]), "mse_ratio": ratio}
    return stats


@dataclass
class ModuleReport:
    """One target module's line in the init report (`rank` and `scaling`: the module's own, as PEFT set them)."""

    name: str
    shape: tuple[int, int]
    storage_dtype: str
    rank: int = 0
    scaling: float = 0.0
    mse: float | None = None
    optimal_mse: float | None = None
    mse_ratio: float | None = None
    reconstruction_max_abs: float = 0.0
    reconstruction_rel: float = 0.0
    quantized_init_error: float | None = None
    qlora_error: float | None = None


@dataclass
class InitReport:
    """What an init did to each target module.

    `reconstruction_max_abs` is max|R + s·B·A − W0| with R, B, A as stored in the model (so it includes the
    rounding of the storage dtype, or the quantization of R); `reconstruction_rel` is ‖R + s·B·A − W0‖ / ‖W0‖.
    On bitsandbytes bases, `quantized_init_error` (= `reconstruction_rel`) sits next to `qlora_error`,
    ‖Q(W0) − W0‖ / ‖W0‖, the error plain QLoRA starts from.

    `rank` and `scaling` are the config's defaults; with `rank_pattern` / `alpha_pattern` (or EVA's redistribution)
    each module's own are in `modules`, summarised by `rank_range` and `scaling_range`.
    """

    variant: str
    rank: int
    scaling: float
    residual: bool
    source: str
    modules: list[ModuleReport] = field(default_factory=list)

    @property
    def rank_range(self) -> tuple[int, int]:
        """(smallest, largest) rank over the modules; `(rank, rank)` without modules.

        Example:
            >>> InitReport("pissa", 4, 1.0, True, "", [ModuleReport("q", (8, 8), "float32", rank=2, scaling=2.0),
            ...     ModuleReport("v", (8, 8), "float32", rank=6, scaling=0.5)]).rank_range
            (2, 6)
        """
        ranks = [m.rank for m in self.modules] or [self.rank]
        return min(ranks), max(ranks)

    @property
    def scaling_range(self) -> tuple[float, float]:
        """(smallest, largest) LoRA scaling over the modules; `(scaling, scaling)` without modules."""
        scalings = [m.scaling for m in self.modules] or [self.scaling]
        return min(scalings), max(scalings)

    @property
    def max_reconstruction_error(self) -> float:
        """The largest `reconstruction_max_abs` over modules."""
        return max((m.reconstruction_max_abs for m in self.modules), default=0.0)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (for logs and trainer loggers)."""
        return asdict(self)

    def summary(self, max_rows: int = 12) -> str:
        """A plain-text table, one row per module (the first `max_rows`), plus totals."""
        (low, high), (s_low, s_high) = self.rank_range, self.scaling_range
        rank = f"{low}" if low == high else f"{low}..{high}"
        scaling = f"{s_low:g}" if s_low == s_high else f"{s_low:g}..{s_high:g}"
        lines = [
            f"init: variant={self.variant} rank={rank} scaling={scaling} "
            f"residual={'yes' if self.residual else 'no'} factors={self.source}",
            f"{'module':<48} {'shape':>11} {'dtype':>9} {'fit MSE':>10} {'/optimum':>9} {'max|R+sBA-W0|':>14}",
        ]
        for module in self.modules[:max_rows]:
            lines.append(
                f"{module.name[-48:]:<48} {'x'.join(map(str, module.shape)):>11} {module.storage_dtype:>9} "
                f"{format_statistic(module.mse, '.3e'):>10} {format_statistic(module.mse_ratio, '.4f'):>9} "
                f"{module.reconstruction_max_abs:>14.3e}"
            )
        if len(self.modules) > max_rows:
            lines.append(f"... {len(self.modules) - max_rows} more modules")
        lines.append(f"max reconstruction error over {len(self.modules)} modules: {self.max_reconstruction_error:.3e}")
        return "\n".join(lines)


def format_statistic(value: float | None, spec: str) -> str:
    """`value` in the format `spec`, or `—` where there is none (a variant not fitted to W0, an undefined ratio).

    Example:
        >>> format_statistic(2.5e-4, ".3e"), format_statistic(None, ".3e"), format_statistic(float("nan"), ".4f")
        ('2.500e-04', '—', '—')
    """
    if value is None or math.isnan(value):
        return NO_STATISTIC
    return format(value, spec)


def fit_table(stats: Mapping[str, Mapping[str, float]], shapes: Mapping[str, Sequence[int]]) -> str:
    """The per-module table of `inilora-hf inspect`: shape, fit MSE, the rank-r SVD optimum and their ratio, one row
    per module of `shapes` (sorted); `—` where a module has no statistics (variants not fitted to W0).

    Example:
        >>> print(fit_table({}, {"model.layers.0.self_attn.q_proj": (64, 64)}))
        module                                                     shape    fit MSE    optimal    ratio
        model.layers.0.self_attn.q_proj                            64x64          —          —        —
    """
    lines = [f"{'module':<52} {'shape':>11} {'fit MSE':>10} {'optimal':>10} {'ratio':>8}"]
    for name in sorted(shapes):
        row = stats.get(name, {})
        lines.append(
            f"{name[-52:]:<52} {'x'.join(map(str, shapes[name])):>11} {format_statistic(row.get('mse'), '.3e'):>10} "
            f"{format_statistic(row.get('optimal_mse'), '.3e'):>10} {format_statistic(row.get('mse_ratio'), '.4f'):>8}"
        )
    return "\n".join(lines)
