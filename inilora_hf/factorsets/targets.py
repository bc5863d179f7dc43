"""Finding the Linear modules a config targets, with PEFT's matching rules and clear errors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from inilora_hf.errors import TargetModuleError
from inilora_hf.linalg.bnb import bnb_bits, dequantize
from inilora_hf.variants.config import InitConfig

ALL_LINEAR = "all-linear"


def find_target_linears(
    model: nn.Module, target_modules: Sequence[str] | str, *, allow_meta: bool = False
) -> dict[str, nn.Linear]:
    """Map module name → `nn.Linear` for every module `target_modules` selects in `model`.

    Matching follows `peft.LoraConfig`: a list matches exact names or name suffixes after a dot, a string is
    a regular expression matched against the full name, and `"all-linear"` selects every Linear except the
    output layer. bitsandbytes `Linear4bit`/`Linear8bitLt` are Linear subclasses and count as Linear.

    Args:
        model: The model to search.
        target_modules: As `peft.LoraConfig.target_modules`.
        allow_meta: Accept weights on the meta device: a skeleton built without loading weights, whose
            targets are only named and checked (the streamed `compute` reads the weights from the files).

    Raises:
        TargetModuleError: nothing matches, a name of a `target_modules` list matches no module, a match is not
            an `nn.Linear` (an Embedding, Conv1D, ...), or (unless `allow_meta`) a matched weight is on the meta
            device.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
        >>> sorted(find_target_linears(model, ["q_proj", "v_proj"]))
        ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.v_proj']
    """
    if target_modules == ALL_LINEAR:
        get_output_embeddings = getattr(model, "get_output_embeddings", None)
        output = get_output_embeddings() if get_output_embeddings is not None else None
        found = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not output}
    else:
        matcher = LoraConfig(target_modules=target_modules if isinstance(target_modules, str) else list(target_modules))
        found = {n: m for n, m in model.named_modules() if n and _is_match(check_target_module_exists(matcher, n))}
    # Every name of a list must match: a misspelt one would otherwise be dropped silently (and recorded).
    unmatched = [] if isinstance(target_modules, str) else _unmatched(target_modules, list(found))
    if not found or unmatched:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        model_name = type(model).__name__
        if not found:
            problem = f"target_modules={target_modules!r} matches no module of this {model_name}."
        else:
            problem = (
                f"{', '.join(map(repr, unmatched))} in target_modules={list(target_modules)!r} "
                f"{'matches' if len(unmatched) == 1 else 'match'} no module of this {model_name}; every name must "
                f"select at least one module: fix or remove {'it' if len(unmatched) == 1 else 'them'}."
            )
        raise TargetModuleError(f"{problem} Its Linear layers end in: {', '.join(suffixes[:20])}.")
    not_linear = {n: type(m).__name__ for n, m in found.items() if not isinstance(m, nn.Linear)}
    if not_linear:
        name, kind = next(iter(sorted(not_linear.items())))
        raise TargetModuleError(
            f"Target module {name!r} is a {kind}, not a torch.nn.Linear; inilora_hf initialises Linear layers "
            f"only. Remove it from target_modules (e.g. target only the attention projections)."
        )
    for name, module in found.items():
        if not allow_meta and module.weight.device.type == "meta":
            raise TargetModuleError(
                f"The weight of {name!r} is on the meta device (not loaded). Load the model without "
                "`low_cpu_mem_usage`/`device_map='meta'` before initialising LoRA factors."
            )
    return found


def _is_match(result: object) -> bool:
    """`check_target_module_exists` returns True, a `re.Match`, False/None, or an exclusion marker."""
    return result is True or (result is not None and result is not False and hasattr(result, "group"))


def _unmatched(target_modules: Sequence[str], names: list[str]) -> list[str]:
    """The entries of a `target_modules` list that select none of `names` (by PEFT's rules)."""
    missing = []
    for target in target_modules:
        matcher = LoraConfig(target_modules=[target])
        if not any(_is_match(check_target_module_exists(matcher, name)) for name in names):
            missing.append(target)
    return missing


def check_rank(modules: dict[str, nn.Linear], config: InitConfig) -> None:
    """Raise a `ValueError` if a module's rank (`config.rank_for`) exceeds its min(out, in) (the factors would be
    rank-deficient)."""
    for name, module in sorted(modules.items()):
        limit = min(module.out_features, module.in_features)
        rank = config.rank_for(name)
        if rank > limit:
            raise ValueError(
                f"rank={rank} is larger than min(out_features, in_features)={limit} of {name!r} "
                f"({module.out_features}×{module.in_features}). Use rank ≤ {limit} (`rank` / `rank_pattern`) or "
                "target larger modules."
            )


def read_weight(module: nn.Linear) -> torch.Tensor:
    """The module's weight `W0` as fp32 `(out, in)` (dequantized for bitsandbytes layers)."""
    if bnb_bits(module) is not None:
        return dequantize(module)
    return module.weight.detach().float()
