"""The model card (README.md) of a factor-set repo: Hub metadata, configuration, fit statistics, usage, citation."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import PurePosixPath
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from inilora_hf.hub.transport import is_hub_id
from inilora_hf.variants import get_variant

from .fingerprint import out_in_shape
from .format import FactorSetData
from .targets import CONV1D_LAYOUT

MAX_TABLE_ROWS = 48


def factor_set_card(
    factor_set: FactorSetData, repo_id: str, *, license: str | None = None, link_base_model: bool = True
) -> ModelCard:
    """The model card of a factor-set repo.

    YAML metadata: `base_model` (when the recorded base model is a Hub id) with `base_model_relation: adapter`,
    `library_name: peft`, tags `inilora`, `lora`, `peft` and the variant name, `license` when given, and an
    `inilora` block with the configuration. The body says what the repo is, how to use it with and without
    inilora_hf, the exact `InitConfig`, per-module fit statistics, provenance and the method's citation.

    Args:
        factor_set: The factor set the repo holds.
        repo_id: The repo's id (used in the usage snippets).
        license: A Hub license id (e.g. `"apache-2.0"`, `"llama3.2"`); usually the base model's.
        link_base_model: Put the base model's Hub id in the YAML metadata (`push_factor_set` turns this off when
            the base model does not exist on the Hub, which would make the Hub reject the card).

    Example:
        >>> card = factor_set_card(factor_set, "my-org/llama-3.2-1b-inilora-r8", license="llama3.2")  # doctest: +SKIP
        >>> card.data.base_model, card.data.library_name                                              # doctest: +SKIP
        ('meta-llama/Llama-3.2-1B', 'peft')
        >>> card.save("README.md")                                                                     # doctest: +SKIP
    """
    config = factor_set.config
    spec = get_variant(config.variant)
    base = factor_set.base_model if link_base_model and is_hub_id(factor_set.base_model) else None
    tags = list(dict.fromkeys(["inilora", "lora", "peft", config.variant, "lora-initialization"]))
    relation: dict[str, Any] = {"base_model_relation": "adapter"} if base else {}
    data = ModelCardData(
        base_model=base,
        library_name="peft",
        license=license,
        tags=tags,
        **relation,
        inilora={
            "variant": config.variant,
            "rank": config.rank,
            "lora_alpha": config.lora_alpha,
            "use_rslora": config.use_rslora,
            "target_modules": sorted(factor_set.factors),
            "residual": spec.residual,
            "base_revision": factor_set.base_revision,
            "config_hash": config.config_hash(),
        },
    )
    sections = [
        _intro(factor_set, repo_id, base),
        _usage(factor_set, repo_id),
        _configuration(factor_set),
        _statistics(factor_set),
        _provenance(factor_set),
        _citation(spec.citation),
    ]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(s.strip("\n") for s in sections if s) + "\n"
    return ModelCard(content)


def _base_label(factor_set: FactorSetData, base: str | None) -> str:
    if base:
        return f"[{base}](https://huggingface.co/{base})"
    if is_hub_id(factor_set.base_model):
        return f"`{factor_set.base_model}`"
    if factor_set.base_model:
        return f"`{PurePosixPath(str(factor_set.base_model)).name}` (a local model)"
    return "an unnamed base model"


def _intro(factor_set: FactorSetData, repo_id: str, base: str | None) -> str:
    config = factor_set.config
    spec = get_variant(config.variant)
    revision = f" (revision `{factor_set.base_revision}`)" if factor_set.base_revision else ""
    residual = (
        "The variant is *residual*: at initialisation each target weight `W0` of the base model is replaced by "
        "`R = W0 − s·B0·A0` (s = LoRA scaling), so the model with the adapter computes exactly what the base "
        "model computes, and training starts from factors that carry `W0`'s structure. The residual is not "
        "stored here: it is recomputed from the base weights (see *Usage*)."
        if spec.residual
        else "The base weights are used unchanged; only the adapter's initial A/B differ from a fresh LoRA."
    )
    adapter_row = (
        "| `init_adapter/` | the same A/B as a standard PEFT LoRA adapter (`init_lora_weights: true`) |\n"
        if not factor_set.variant_extras
        else f"| `factors*.safetensors` | also `<module>.{'`, `<module>.'.join(sorted(factor_set.variant_extras))}`: "
        "variant tensors a plain LoRA adapter cannot hold, so there is no `init_adapter/` |\n"
    )
    file_rows = (
        "| `inilora_factors.json` | the InitConfig, the base model's identity and per-module weight fingerprints, "
        "fit statistics, checksums |\n"
        "| `factors*.safetensors` | `<module>.lora_A` `(r, in)` and `<module>.lora_B` `(out, r)` in fp32, for "
        f"{len(factor_set.factors)} modules |\n"
    )
    return f"""
# {repo_id.split("/")[-1]}

Initial LoRA factors (**{config.variant}**, rank {config.rank}, alpha {config.lora_alpha:g}) for
{_base_label(factor_set, base)}{revision}, computed with [inilora_hf](https://pypi.org/project/inilora-hf/).

This is **not a fine-tuned model**: it is the starting point of a LoRA fine-tune, shared so that the
initialisation is computed once and reused across runs. {spec.description}

{residual}

| file | content |
|---|---|
{file_rows}{adapter_row}"""


def _usage(factor_set: FactorSetData, repo_id: str) -> str:
    config = factor_set.config
    spec = get_variant(config.variant)
    hub_base = is_hub_id(factor_set.base_model)
    # Never publish a local path: name the directory only.
    local_name = PurePosixPath(str(factor_set.base_model or "base-model")).name
    base_ref = factor_set.base_model if hub_base else f"path/to/{local_name}"
    revision = f", revision={json.dumps(factor_set.base_revision)}" if hub_base and factor_set.base_revision else ""
    conv1d = any(fingerprint.get("layout") == CONV1D_LAYOUT for fingerprint in factor_set.fingerprints.values())
    # Conv1D layers (GPT-2) store their weight in × out: the (out, in) delta is transposed to match.
    transpose = (
        "\n        if type(model.get_submodule(name)).__name__ == 'Conv1D':\n            delta = delta.T"
        if conv1d
        else ""
    )
    if factor_set.variant_extras:
        plain = None
    elif spec.residual:
        plain = f"""
import math

import torch
from huggingface_hub import hf_hub_download
from peft import PeftConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

REPO = {json.dumps(repo_id)}
config = PeftConfig.from_pretrained(REPO, subfolder="init_adapter")
adapter = load_file(hf_hub_download(REPO, "adapter_model.safetensors", subfolder="init_adapter"))
{_scaling_code(factor_set)}

# The residual model: W <- W - s * B0 @ A0 for every target module (computed in fp32).
model = AutoModelForCausalLM.from_pretrained({json.dumps(base_ref)}{revision}, dtype=torch.float32)
with torch.no_grad():
    for name in sorted(config.target_modules):
        lora_A = adapter[f"base_model.model.{{name}}.lora_A.weight"].float()
        lora_B = adapter[f"base_model.model.{{name}}.lora_B.weight"].float()
        weight = model.get_submodule(name).weight
        delta = scaling_of(name) * (lora_B @ lora_A){transpose}
        weight.copy_((weight.float() - delta).to(weight.dtype))

model = PeftModel.from_pretrained(model, REPO, subfolder="init_adapter", is_trainable=True)
"""
    else:
        plain = f"""
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

REPO = {json.dumps(repo_id)}
model = AutoModelForCausalLM.from_pretrained({json.dumps(base_ref)}{revision}, dtype=torch.float32)
model = PeftModel.from_pretrained(model, REPO, subfolder="init_adapter", is_trainable=True)
"""
    return f"""
## Usage

With inilora_hf (`pip install inilora-hf`): the factors are downloaded once, checked against the base weights,
and written into a fresh PEFT model on every call, so the callable can be handed to a Trainer as `model_init`.

```python
from inilora_hf import inilora_init

init = inilora_init({json.dumps(base_ref)}, factors={json.dumps(repo_id)})
model = init()  # a peft.PeftModel ready to train; or Trainer(model_init=init, ...) / inilora_hf.SFTTrainer
```

Download only (standard Hugging Face cache; works offline afterwards):

```bash
hf download {repo_id}
inilora-hf pull {repo_id}   # same, prints the local path
```

{_plain_usage(plain)}"""


def _scaling_code(factor_set: FactorSetData) -> str:
    """The card snippet's `scaling_of(name)`: one scaling, or PEFT's per-module lookup with rank/alpha patterns."""
    config = factor_set.config
    if not (config.rank_pattern or config.alpha_pattern):
        return (
            "\n\ndef scaling_of(name):  # one rank and alpha for every module\n"
            "    return config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)\n"
        )
    return """from peft.utils.other import get_pattern_key


def scaling_of(name):  # each module's rank and alpha, looked up as PEFT does
    r = config.rank_pattern.get(get_pattern_key(list(config.rank_pattern), name), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(list(config.alpha_pattern), name), config.lora_alpha)
    return alpha / (math.sqrt(r) if config.use_rslora else r)
"""


def _module_ranks(factor_set: FactorSetData) -> str:
    """A table of the modules whose rank or alpha differs from the defaults (`rank_pattern` / `alpha_pattern`)."""
    config = factor_set.config
    rows = [
        f"| `{name}` | {factors.lora_A.shape[0]} | {config.alpha_for(name):g} | {config.scaling_for(name):g} |"
        for name, factors in sorted(factor_set.factors.items())
        if factors.lora_A.shape[0] != config.rank or config.alpha_for(name) != config.lora_alpha
    ]
    if not rows:
        return ""
    header = "Per-module ranks (`rank_pattern` / `alpha_pattern`); other modules use the defaults above:\n\n"
    return header + "| module | r | alpha | s |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"


def _plain_usage(code: str | None) -> str:
    if code is None:
        return (
            "Without inilora_hf: this variant's factors include tensors that a plain PEFT LoRA adapter cannot hold, "
            "so there is no `init_adapter/`; a model trained from them converts to a standard rank-r adapter with "
            "`inilora_hf.convert.to_lora`.\n"
        )
    return f"Without inilora_hf, with plain `transformers` + `peft`:\n\n```python{code}```\n"


def _configuration(factor_set: FactorSetData) -> str:
    config = factor_set.config
    return f"""
## Configuration

LoRA scaling `s = {config.scaling:g}` ({"lora_alpha / sqrt(r)" if config.use_rslora else "lora_alpha / r"}).
The exact `InitConfig`:

```json
{json.dumps(config.to_dict(), indent=2, sort_keys=True)}
```

{_module_ranks(factor_set)}"""


def _number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4g}"


def _statistics(factor_set: FactorSetData) -> str:
    stats = factor_set.stats
    if not stats:
        return ""
    names = sorted(stats)
    lines = [
        "## Fit statistics",
        "",
        "`mse` = mean((s·B0·A0 − W0)²) over the weight; `optimal_mse` = the best any rank-r factorisation can do "
        "(truncated SVD); `ratio` = mse / optimal_mse (1 is optimal).",
        "",
    ]
    by_type: dict[str, list[dict[str, float]]] = defaultdict(list)
    for name in names:
        by_type[name.rsplit(".", 1)[-1]].append(stats[name])
    if len(names) > MAX_TABLE_ROWS:
        lines += ["| module type | modules | mean mse | mean ratio | worst ratio |", "|---|---:|---:|---:|---:|"]
        for kind, rows in sorted(by_type.items()):
            ratios = [r["mse_ratio"] for r in rows if r.get("mse_ratio") is not None and not math.isnan(r["mse_ratio"])]
            mean_ratio = sum(ratios) / len(ratios) if ratios else None
            worst_ratio = max(ratios) if ratios else None
            lines.append(
                f"| `{kind}` | {len(rows)} | {_number(sum(r['mse'] for r in rows) / len(rows))} | "
                f"{_number(mean_ratio)} | {_number(worst_ratio)} |"
            )
        lines.append("")
    lines += ["| module | shape | mse | optimal_mse | ratio |", "|---|---|---:|---:|---:|"]
    for name in names[:MAX_TABLE_ROWS]:
        row = stats[name]
        shape = "×".join(map(str, out_in_shape(factor_set.fingerprints.get(name, {}))))
        lines.append(
            f"| `{name}` | {shape} | {_number(row.get('mse'))} | {_number(row.get('optimal_mse'))} | "
            f"{_number(row.get('mse_ratio'))} |"
        )
    if len(names) > MAX_TABLE_ROWS:
        lines.append(
            f"\n… and {len(names) - MAX_TABLE_ROWS} more modules (all {len(names)} are in `inilora_factors.json`)."
        )
    return "\n".join(lines)


def _provenance(factor_set: FactorSetData) -> str:
    info = factor_set.info
    lines = ["## How it was computed", ""]
    if "compute_device" in info or "compute_seconds" in info:
        lines.append(
            f"- computed on **{info.get('compute_device', 'unknown device')}** in "
            f"**{_number(info.get('compute_seconds'))} s**"
        )
    if info.get("created_at"):
        lines.append(f"- created {info['created_at']}")
    if factor_set.base_revision:
        lines.append(f"- base model revision `{factor_set.base_revision}`")
    lines.append(f"- base-weight digest `{factor_set.model_key}`, config hash `{factor_set.config.config_hash()}`")
    versions = info.get("versions") or {}
    if versions:
        lines.append("- " + ", ".join(f"{name} {version}" for name, version in sorted(versions.items())))
    return "\n".join(lines)


def _citation(citation: str | None) -> str:
    if not citation:
        return ""
    return f"## Citation\n\n```bibtex\n{citation.strip()}\n```"
