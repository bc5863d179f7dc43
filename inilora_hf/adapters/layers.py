"""Typed access to the per-adapter modules of a PEFT LoRA layer, and freezing some of them for training.

PEFT keeps each adapter's `lora_A` and `lora_B` (and, for LoRA-XS, `lora_core`) in `nn.ModuleDict`s on the layer.
Their items type as plain `nn.Module`, whose unknown attributes type as `Tensor | Module`, and `lora_core` is added
at run time; `adapter_linear` returns them as the `nn.Linear`s they are, so that the code using their weights is
type-checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from peft.tuners.lora import LoraLayer
from torch import nn


def adapter_linear(layer: LoraLayer, container: str, adapter_name: str) -> nn.Linear:
    """`layer.<container>[adapter_name]`: the adapter's `lora_A`, `lora_B` or `lora_core` Linear.

    Example:
        >>> from peft import LoraConfig, get_peft_model
        >>> model = get_peft_model(nn.Sequential(nn.Linear(16, 8)), LoraConfig(r=4, target_modules=["0"]))
        >>> adapter_linear(model.base_model.model[0], "lora_A", "default").weight.shape
        torch.Size([4, 16])
    """
    modules: nn.ModuleDict = getattr(layer, container)
    return cast(nn.Linear, modules[adapter_name])


def freeze_adapter_weights(layer: LoraLayer, adapter_name: str, containers: Sequence[str]) -> None:
    """Keep `containers` (e.g. `"lora_B"`) of `adapter_name` frozen for training, the way PEFT's own MiCA and LoRA-XS
    layers do: through `frozen_peft_weight_names`, which PEFT re-applies after `set_adapter`,
    `enable_adapter_layers` and `load_adapter(is_trainable=True)` (Trainer resume).

    Example:
        >>> from peft import LoraConfig, get_peft_model
        >>> model = get_peft_model(nn.Sequential(nn.Linear(16, 8)), LoraConfig(r=4, target_modules=["0"]))
        >>> freeze_adapter_weights(model.base_model.model[0], "default", ["lora_B"])
        >>> adapter_linear(model.base_model.model[0], "lora_B", "default").weight.requires_grad
        False
    """
    frozen = {name: tuple(names) for name, names in layer.frozen_peft_weight_names.items()}
    frozen[adapter_name] = tuple(dict.fromkeys((*frozen.get(adapter_name, ()), *containers)))
    layer.frozen_peft_weight_names = frozen  # an instance copy: the class-level default stays empty
    layer._freeze_non_trainable_peft_weights(adapter_name)
