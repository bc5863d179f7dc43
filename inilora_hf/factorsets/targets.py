"""Finding the Linear-like modules a config targets, with PEFT's matching rules and clear errors.

Two layouts are targeted: `torch.nn.Linear` (weight `out × in`, bitsandbytes' Linear4bit/8bitLt included) and
transformers' `Conv1D` (GPT-2 and its relatives; weight stored `in × out`, PEFT's `fan_in_fan_out=True`).
Everything above this module sees weights as fp32 `out × in` (`read_weight`); only `to_layout` writes them back
in the layer's own layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.constants import SEQ_CLS_HEAD_NAMES, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from inilora_hf.errors import TargetModuleError
from inilora_hf.linalg.bnb import bnb_bits, dequantize
from inilora_hf.variants.config import InitConfig

ALL_LINEAR = "all-linear"
#: The fingerprint `layout` of a transformers `Conv1D` weight (stored `in × out`); a Linear's records none.
CONV1D_LAYOUT = "conv1d"
#: A layer inilora_hf initialises: an `nn.Linear` (bitsandbytes' included) or a transformers `Conv1D`.
TargetLayer = nn.Linear | Conv1D
#: Why mixture-of-experts weights are refused, in every message about them.
MOE_UNSUPPORTED = (
    "and inilora_hf does not initialise those (PEFT 0.21's ParamWrapper gives each expert its own rank-r factors, "
    "but no variant, export or reload here handles them yet)"
)
#: `target_modules` when neither the caller nor PEFT's table for the model type names any.
FALLBACK_TARGETS = ("q_proj", "v_proj")


def default_target_modules(model: nn.Module) -> tuple[str, ...] | str:
    """PEFT's own default `target_modules` for `model`'s `config.model_type` (the table `get_peft_model` uses when
    `LoraConfig.target_modules` is None), or `FALLBACK_TARGETS` for a model type PEFT has no default for.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> default_target_modules(GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=16)))
        ('c_attn',)
    """
    return peft_default_targets(getattr(getattr(model, "config", None), "model_type", None))


def peft_default_targets(model_type: str | None) -> tuple[str, ...] | str:
    """PEFT's default `target_modules` for a transformers `model_type` (`config.json`'s), or `FALLBACK_TARGETS`.

    Example:
        >>> peft_default_targets("gpt_neox"), peft_default_targets("no-such-type")
        (('query_key_value',), ('q_proj', 'v_proj'))
    """
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type or "")
    if targets is None:
        return FALLBACK_TARGETS
    return targets if isinstance(targets, str) else tuple(sorted(targets))


def find_target_linears(
    model: nn.Module, target_modules: Sequence[str] | str, *, allow_meta: bool = False
) -> dict[str, TargetLayer]:
    """Map module name → layer (`nn.Linear` or transformers `Conv1D`) for every module `target_modules` selects.

    Matching follows `peft.LoraConfig`: a list matches exact names or name suffixes after a dot, a string is
    a regular expression matched against the full name, and `"all-linear"` selects every Linear and Conv1D
    except the output layer: the LM head or, for a model without one, a classification head (`score`,
    `classifier`: PEFT's names). bitsandbytes `Linear4bit`/`Linear8bitLt` are Linear subclasses.

    Args:
        model: The model to search.
        target_modules: As `peft.LoraConfig.target_modules`.
        allow_meta: Accept weights on the meta device: a skeleton built without loading weights, whose
            targets are only named and checked (the streamed `compute` reads the weights from the files).

    Raises:
        TargetModuleError: nothing matches, a name of a `target_modules` list matches no module, a match is not
            an `nn.Linear` or `Conv1D` (an Embedding, the 3-D expert weights of a mixture of experts, ...), or
            (unless `allow_meta`) a matched weight is on the meta device.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
        >>> sorted(find_target_linears(model, ["q_proj", "v_proj"]))
        ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.v_proj']
    """
    if target_modules == ALL_LINEAR:
        found = {n: m for n, m in model.named_modules() if isinstance(m, TargetLayer) and not _is_head(model, n)}
    else:
        matcher = LoraConfig(target_modules=target_modules if isinstance(target_modules, str) else list(target_modules))
        found = {n: m for n, m in model.named_modules() if n and _is_match(check_target_module_exists(matcher, n))}
    # Every name of a list must match: a misspelt one would otherwise be dropped silently (and recorded).
    unmatched = [] if isinstance(target_modules, str) else _unmatched(target_modules, list(found))
    if not found or unmatched:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, TargetLayer)})
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
    not_linear = {n: m for n, m in found.items() if not isinstance(m, TargetLayer)}
    if not_linear:
        name, module = next(iter(sorted(not_linear.items())))
        experts = [p for p, value in module.named_parameters(recurse=False) if value.dim() == 3]
        detail = (
            f"; it holds the 3-D expert weights {experts} of a mixture of experts, which PEFT adapts only through "
            f"`target_parameters`, {MOE_UNSUPPORTED}"
            if experts
            else ""
        )
        raise TargetModuleError(
            f"Target module {name!r} is a {type(module).__name__}, not a torch.nn.Linear or transformers Conv1D"
            f"{detail}. inilora_hf initialises Linear and Conv1D layers only: remove it from target_modules (e.g. "
            "target the attention projections, or 'all-linear')."
        )
    for name, module in found.items():
        if not allow_meta and module.weight.device.type == "meta":
            raise TargetModuleError(
                f"The weight of {name!r} is on the meta device (not loaded). Load the model without "
                "`low_cpu_mem_usage`/`device_map='meta'` before initialising LoRA factors."
            )
    return found


def _is_head(model: nn.Module, name: str) -> bool:
    """Whether module `name` is (in) the output layer `"all-linear"` leaves out: the output embeddings, or without
    them a sequence-classification head named as PEFT's `SEQ_CLS_HEAD_NAMES`."""
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    output = get_output_embeddings() if get_output_embeddings is not None else None
    if output is not None:
        return model.get_submodule(name) is output
    return any(name == head or name.startswith(f"{head}.") for head in SEQ_CLS_HEAD_NAMES)


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


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """`(out_features, in_features)` of a Linear or Conv1D (whose weight is stored `in × out`).

    Example:
        >>> layer_shape(Conv1D(nf=6, nx=4)), layer_shape(nn.Linear(4, 6))
        ((6, 4), (6, 4))
    """
    if isinstance(module, Conv1D):
        return module.nf, module.nx
    linear = cast(nn.Linear, module)
    return linear.out_features, linear.in_features


def is_conv1d(module: nn.Module) -> bool:
    """Whether `module` stores its weight `in × out` (a transformers `Conv1D`; PEFT's `fan_in_fan_out=True`)."""
    return isinstance(module, Conv1D)


def check_rank(modules: Mapping[str, nn.Module], config: InitConfig) -> None:
    """Raise a `ValueError` if a module's rank (`config.rank_for`) exceeds its min(out, in) (the factors would be
    rank-deficient)."""
    for name, module in sorted(modules.items()):
        out_features, in_features = layer_shape(module)
        limit = min(out_features, in_features)
        rank = config.rank_for(name)
        if rank > limit:
            raise ValueError(
                f"rank={rank} is larger than min(out_features, in_features)={limit} of {name!r} "
                f"({out_features}×{in_features}). Use rank ≤ {limit} (`rank` / `rank_pattern`) or "
                "target larger modules."
            )


def read_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight `W0` as fp32 `(out, in)`: dequantized for bitsandbytes layers, transposed (a view)
    for Conv1D.

    Example:
        >>> layer = Conv1D(nf=6, nx=4)
        >>> torch.equal(read_weight(layer), layer.weight.T)
        True
    """
    if bnb_bits(module) is not None:
        return dequantize(module)
    weight = cast(torch.Tensor, module.weight).detach().float()
    return weight.T if is_conv1d(module) else weight


def to_layout(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """An `(out, in)` matrix in `module`'s storage layout (transposed for Conv1D; the same tensor otherwise)."""
    return weight.T if is_conv1d(module) else weight


def layout_of(module: nn.Module) -> str | None:
    """The fingerprint `layout` of a target layer: `CONV1D_LAYOUT` for Conv1D, None for a Linear."""
    return CONV1D_LAYOUT if is_conv1d(module) else None
