"""The LoRA-XS layer: `h = W0·x + s·B·R·A·x` with `A`, `B` frozen and only the r×r core `R` trained.

LoRA-SB (and any variant whose factors carry a `lora_core` extra tensor) trains in this architecture. It is
built on PEFT's own LoRA layer rather than a new module type, so that everything PEFT and the Trainer do with
a LoRA model keeps working:

* `lora_A` / `lora_B` stay PEFT's `nn.Linear`s and hold the frozen A `(r, in)` and B `(out, r)`. They are
  declared frozen through PEFT's `frozen_peft_weight_names`, which PEFT re-applies after `set_adapter`,
  `enable_adapter_layers` and `load_adapter(is_trainable=True)` (Trainer resume), so they never become
  trainable by accident.
* The core is one more adapter container on the layer, `lora_core = nn.ModuleDict({adapter: nn.Linear(r, r)})`,
  registered in the layer's `adapter_layer_names` (as PEFT's KaSA does for `lora_diag`). PEFT saves every
  tensor of a tuner layer except its base layer, so `save_pretrained`, every `checkpoint-N` and
  `trainer.save_model()` contain `...q_proj.lora_core.weight` next to `lora_A` / `lora_B`, and
  `load_adapter` puts it back. Only the cores are trainable: r² parameters per module.
* A `peft.tuners.lora.layer.LoraVariant` (the hook PEFT uses for DoRA, KaSA, MiCA) gives the layer its
  forward `result + s·B(R(A(dropout(x))))` and its merge / unmerge `W ± s·B·R·A`, so `merge_and_unload()`
  is exact.

The adapter is not loadable by plain `PeftModel.from_pretrained` (PEFT has no LoRA-XS); the exact standard
equivalent is the rank-r LoRA `B' = B·R`, `A' = A`, which `inilora_hf.convert.to_lora` writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeGuard

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import LoraVariant
from peft.utils.other import transpose
from torch import nn

from inilora_hf.log import get_logger

# `ModuleFactors.extra` key of the r×r core (saved in factor sets as `<module>.lora_core`), and the name of the
# adapter container on PEFT layers (saved in adapters as `<module>.lora_core.weight`). A variant that returns
# factors with this extra trains in the LoRA-XS architecture.
from inilora_hf.variants.data_driven import CORE_KEY

from .layers import adapter_linear, freeze_adapter_weights

logger = get_logger(__name__)


class LoraXSVariant(LoraVariant):
    """PEFT layer variant for LoRA-XS: delta `s·B·R·A`, trained through the core `R` only."""

    def supports_lora_conversion(self) -> bool:
        # PEFT's generic conversion reads `get_delta_weight` (plain B·A); `inilora_hf.convert.to_lora` is exact.
        return False

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, **kwargs: Any) -> None:
        """Nothing to do: `attach_core` creates the core with its initial value."""

    @staticmethod
    def delta_weight(module: LoraLayer, adapter: str) -> torch.Tensor:
        """`s·B·R·A` in fp32 (transposed for `fan_in_fan_out` layers)."""
        lora_B = adapter_linear(module, "lora_B", adapter).weight.float()
        core = adapter_linear(module, CORE_KEY, adapter).weight.float().to(lora_B.device)
        lora_A = adapter_linear(module, "lora_A", adapter).weight.float().to(lora_B.device)
        fan_in_fan_out = getattr(module, "fan_in_fan_out", False)  # set by PEFT's Linear-like LoRA layers
        return transpose(lora_B @ core @ lora_A, fan_in_fan_out) * module.scaling[adapter]

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + LoraXSVariant.delta_weight(module, active_adapter).to(orig_weight)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += LoraXSVariant.delta_weight(module, active_adapter).to(orig_weight)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - LoraXSVariant.delta_weight(module, active_adapter).to(orig_weight)

    @staticmethod
    def forward(
        module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        lora_A = module.lora_A[active_adapter]
        lora_B = module.lora_B[active_adapter]
        core = adapter_linear(module, CORE_KEY, active_adapter)
        dropout = module.lora_dropout[active_adapter]
        return result + lora_B(core(lora_A(dropout(x)))) * module.scaling[active_adapter]


def attach_core(layer: LoraLayer, adapter_name: str, core: torch.Tensor) -> nn.Linear:
    """Turn `adapter_name` of a PEFT LoRA layer into LoRA-XS: add the trainable core `R` (a copy of `core`),
    freeze its `lora_A` / `lora_B`, and route forward and merge through `B·R·A`.

    Call after `lora_A` / `lora_B` hold their final values (`inilora_hf.adapters.apply` does). Returns the core module.

    Example:
        >>> peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))      # doctest: +SKIP
        >>> layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj                 # doctest: +SKIP
        >>> attach_core(layer, "default", torch.eye(4))                                           # doctest: +SKIP
    """
    if (
        not isinstance(layer, LoraLayer)
        or adapter_name not in layer.lora_A
        or not isinstance(layer.lora_A[adapter_name], nn.Linear)
    ):
        raise TypeError(
            f"LoRA-XS needs a PEFT LoRA Linear layer with adapter {adapter_name!r}; got {type(layer).__name__}. "
            "Target nn.Linear modules only."
        )
    if layer.use_dora.get(adapter_name) or layer.lora_bias.get(adapter_name):
        raise ValueError("LoRA-XS (a variant with a `lora_core`) cannot be combined with `use_dora` or `lora_bias`.")
    current = layer.lora_variant.get(adapter_name)
    if current is not None and not isinstance(current, LoraXSVariant):
        raise ValueError(
            f"Adapter {adapter_name!r} already uses the PEFT variant {type(current).__name__}; LoRA-XS cannot be "
            "stacked on it."
        )
    lora_A = adapter_linear(layer, "lora_A", adapter_name).weight
    rank = lora_A.shape[0]
    if tuple(core.shape) != (rank, rank):
        raise ValueError(f"The LoRA-XS core must be ({rank}, {rank}) for rank {rank}, got {tuple(core.shape)}.")
    if CORE_KEY not in layer.adapter_layer_names:
        setattr(layer, CORE_KEY, nn.ModuleDict())
        # An instance attribute, as PEFT's KaSA does: only layers with a core gain the container.
        layer.adapter_layer_names = (*layer.adapter_layer_names, CORE_KEY)
    module = nn.Linear(rank, rank, bias=False, device=lora_A.device, dtype=lora_A.dtype)
    with torch.no_grad():
        # copy=True: training must never write into the factor set's tensor.
        module.weight.data = core.to(device=lora_A.device, dtype=lora_A.dtype, copy=True).contiguous()
    module.weight.requires_grad_(lora_A.requires_grad)  # trainable exactly when the adapter was (not inference mode)
    cores: nn.ModuleDict = getattr(layer, CORE_KEY)
    cores[adapter_name] = module
    layer.lora_variant[adapter_name] = LoraXSVariant()
    freeze_adapter_weights(layer, adapter_name, ("lora_A", "lora_B"))
    return module


def is_loraxs(layer: object, adapter_name: str) -> TypeGuard[LoraLayer]:
    """Whether `adapter_name` of `layer` is a LoRA-XS adapter (has a core)."""
    return isinstance(layer, LoraLayer) and isinstance(layer.lora_variant.get(adapter_name), LoraXSVariant)


def folded_lora_B(layer: LoraLayer, adapter_name: str) -> torch.Tensor:
    """`lora_B` of the standard LoRA that computes what the layer computes, fp32: `B·R` for LoRA-XS, else `B`.

    Example:
        >>> B = folded_lora_B(layer, "default")                                                # doctest: +SKIP
        >>> delta = layer.scaling["default"] * B @ layer.lora_A["default"].weight              # doctest: +SKIP
    """
    lora_B = adapter_linear(layer, "lora_B", adapter_name).weight.detach().float()
    if not is_loraxs(layer, adapter_name):
        return lora_B
    return lora_B @ adapter_linear(layer, CORE_KEY, adapter_name).weight.detach().float().to(lora_B.device)


def fold_cores(state: dict[str, torch.Tensor], model: PeftModel, *, adapter_name: str) -> int:
    """Rewrite a saved-format adapter state dict (`get_peft_model_state_dict` keys) of a LoRA-XS model into the
    equivalent standard rank-r LoRA, in place: `lora_B ← B·R` (fp32), `lora_core` entries removed. Returns the
    number of layers folded (0 for a model without cores)."""
    folded = 0
    for name, layer in model.get_base_model().named_modules():
        if not is_loraxs(layer, adapter_name):
            continue
        key = f"base_model.model.{name}"
        if f"{key}.lora_B.weight" not in state:
            raise ValueError(f"The adapter state has no lora_B for the LoRA-XS module {name!r}.")
        state[f"{key}.lora_B.weight"] = folded_lora_B(layer, adapter_name).cpu()
        state.pop(f"{key}.{CORE_KEY}.weight", None)
        folded += 1
    return folded


def count_core_parameters(model: nn.Module, *, adapter_name: str = "default") -> tuple[int, int]:
    """`(modules, parameters)`: how many LoRA-XS cores `model` has and their total size (r² each).

    Example:
        >>> model = inilora_init("./base", variant="lora-sb", eta=1e-4, calibration_data=ds)()   # doctest: +SKIP
        >>> count_core_parameters(model)                                                        # doctest: +SKIP
        (4, 256)
    """
    cores = [adapter_linear(m, CORE_KEY, adapter_name) for m in model.modules() if is_loraxs(m, adapter_name)]
    return len(cores), sum(core.weight.numel() for core in cores)


def initial_lora_B(lora_B: torch.Tensor, extra: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The standard-LoRA `B` of initial factors: `B0·R0` when they carry a core, else `B0` (fp32)."""
    core = extra.get(CORE_KEY)
    return lora_B.float() if core is None else lora_B.float() @ core.float()
