"""The README.md model card of a standard export: how to load it, the base model, the init variant and factor set."""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData
from peft import PeftModel

from inilora_hf.adapters.tasks import task_classes
from inilora_hf.hub.transport import is_hub_id
from inilora_hf.training.init_metadata import trained_base
from inilora_hf.variants import get_variant

from .trained import require_factor_set, require_peft


def export_card(model: PeftModel, *, kind: str, adapter_name: str | None = None) -> ModelCard:
    """The model card of a standard export: `kind="merged"` (library transformers) or `"lora"` (library peft).

    It names the base model the run was trained on (for a local one, its absolute path, and what to do on
    another machine), the init variant, the factor set, and the `Auto…` class that loads the export.

    Example:
        >>> print(export_card(trained_model, kind="lora").data.library_name)     # doctest: +SKIP
        peft
    """
    if kind not in ("merged", "lora"):
        raise ValueError(f"kind must be 'merged' or 'lora', got {kind!r}.")
    peft_model = require_peft(model)
    factor_set = require_factor_set(peft_model)
    config = factor_set.config
    spec = get_variant(config.variant)
    adapter = adapter_name or peft_model.active_adapter
    classes = task_classes(peft_model.get_base_model(), peft_model.peft_config[adapter].task_type)
    base, revision = trained_base(peft_model)
    hub_base = base if is_hub_id(base) else None
    data = ModelCardData(
        base_model=hub_base,
        library_name="transformers" if kind == "merged" else "peft",
        tags=["inilora", "lora", config.variant] + (["peft"] if kind == "lora" else []),
    )
    if kind == "merged":
        how = (
            "The LoRA update is merged into the weights: `"
            f'{classes.auto_model}.from_pretrained("<this folder or repo>")` loads it, no base model needed.'
        )
        residual = " The merged weights are `R + s·B·A = W0 + s·(B·A − B0·A0)`." if spec.residual else ""
    else:
        base_load = f'{classes.auto_model}.from_pretrained("{base or "<base model>"}")'
        how = (
            "A standard PEFT LoRA adapter for the unmodified base model: `"
            f'{classes.auto_peft_model}.from_pretrained("<this folder or repo>")` loads the base recorded in '
            f'`adapter_config.json` and the adapter; `PeftModel.from_pretrained({base_load}, "<this folder or '
            'repo>")` does the same with a base you load yourself.'
        )
        residual = (
            " The variant trains on a residual base `R = W0 − s·B0·A0`; this adapter has rank 2r "
            "(`A' = [A; A0]`, `B' = [B, −B0]`, same scaling) so that it applies to the original weights `W0`."
            if spec.residual
            else ""
        )
    if base is None:
        where = "The base model has no name or path on record."
    elif hub_base:
        where = f"Base model: the Hub model `{base}`" + (f" at revision `{revision}`." if revision else ".")
    elif kind == "merged":
        where = f"Base model: the local directory `{base}`."
    else:
        where = (
            f"Base model: the local directory `{base}`, recorded in `adapter_config.json` as this absolute path so "
            "that the adapter loads from any working directory on this machine. Elsewhere, load your copy of that "
            "model and pass it to `PeftModel.from_pretrained`."
        )
    repo, factor_revision = factor_set.info.get("source_repo"), factor_set.info.get("source_revision")
    factors = (f"`{repo}`" + (f" at commit `{factor_revision}`" if factor_revision else "")) if repo else None
    lines = [
        f"# {'Merged model' if kind == 'merged' else 'LoRA adapter'} trained with a `{config.variant}` LoRA init",
        "",
        (
            f"Fine-tuned from `{base or 'an unnamed base model'}` with LoRA (rank {config.rank}, alpha "
            f"{config.lora_alpha:g}{', rsLoRA' if config.use_rslora else ''}{config.pattern_summary()}, "
            f"targets {config.target_modules!r}), "
            f"initialised with the **{config.variant}** variant by `inilora_hf`.{residual}"
        ),
        "",
        how,
        "",
        where,
        "",
        f"- Init variant: `{config.variant}`" + (f" — {spec.description}" if spec.description else ""),
        (
            f"- Factor set: {factors or 'computed locally'} (config hash `{config.config_hash()}`, "
            f"base-weight key `{factor_set.model_key}`)"
        ),
    ]
    if spec.citation:
        lines += ["", "## Citation", "", "```", spec.citation.strip(), "```"]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
