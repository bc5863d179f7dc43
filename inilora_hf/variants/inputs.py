"""`VariantInputs`: what a variant's compute function receives (the target weights and the resolved config)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

from inilora_hf.linalg.grouping import shape_groups

from .config import InitConfig
from .registry import ModuleFactors


@dataclass
class VariantInputs:
    """What a variant's `compute` function receives.

    Attributes:
        weights: Module name (as in the plain transformers model, e.g. `model.layers.0.self_attn.q_proj`) →
            its base weight `W0` as an fp32 `(out, in)` tensor on the CPU.
        config: The resolved `InitConfig` (rank, scaling, options with defaults filled in).
        device: Where heavy computation should run (`cuda` when available, unless the user chose otherwise).
        gradients: For variants registered with `needs_gradients=True`: module name → fp32 gradient of the
            training loss w.r.t. `W0`, accumulated over the calibration samples.
        max_group_bytes: Upper bound on the size of one batched stack of same-shape matrices (memory bound);
            None stacks every same-shape matrix together. Never changes the result.
        std_by_type: Per module type (`q_proj`, ...), the mean over ALL target layers of the per-matrix std of
            `W0 / s`. Set when `weights` holds only a subset of the targets (streamed computation), so that
            statistics pooled across layers stay those of the whole model.
        harvested: For variants registered with `peft_data_pass=True` (`eva`, `corda`, `lora_ga`): module name →
            the factors PEFT's own data-driven init computed on the model and calibration data.
    """

    weights: Mapping[str, torch.Tensor]
    config: InitConfig
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    gradients: Mapping[str, torch.Tensor] | None = None
    max_group_bytes: int | None = None
    std_by_type: Mapping[str, float] | None = None
    harvested: Mapping[str, ModuleFactors] | None = None

    def rank_groups(self, tensors: Mapping[str, torch.Tensor]) -> Iterator[tuple[int, list[str]]]:
        """Yield `(rank, names)`: modules of one shape and one rank (`config.rank_for`), batched within
        `max_group_bytes`; with a single rank the groups are exactly `shape_groups`'.

        Example:
            >>> inputs = VariantInputs({"a": torch.ones(4, 4), "b": torch.ones(4, 4)}, InitConfig("pissa", rank=2,
            ...     target_modules=["a", "b"], rank_pattern={"b": 3}))
            >>> list(inputs.rank_groups(inputs.weights))
            [(2, ['a']), (3, ['b'])]
        """
        by_rank: dict[int, dict[str, tuple[int, ...]]] = {}
        for name in sorted(tensors):
            by_rank.setdefault(self.config.rank_for(name), {})[name] = tuple(tensors[name].shape)
        for rank in sorted(by_rank):
            for names in shape_groups(by_rank[rank], max_bytes=self.max_group_bytes):
                yield rank, names
