"""`TrainerCallback`s: standard-checkpoint export, init report logging, and pushing standard checkpoints.

Works with `transformers.Trainer` and `inilora_hf.SFTTrainer` on models from `inilora_init`:

* `ExportCallback` writes `export/merged/` (plain transformers) and `export/lora/` (plain PEFT adapter on the
  original base) into every `checkpoint-N` and, at the end, into the output directory.
* `InitReportCallback` logs the init report (`init/max_reconstruction_error`, ...) when training starts.
* `PushStandardCheckpointCallback` pushes the merged model and/or the standard adapter to the Hub, with a
  model card, when training ends and `args.push_to_hub` is set.

The exports live under `export/` rather than directly in the checkpoint: `Trainer` treats every direct
subfolder holding an `adapter_model.safetensors` as an extra adapter to load on `resume_from_checkpoint`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from torch import nn
from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from inilora_hf.convert import to_lora, to_merged
from inilora_hf.convert.sharded import is_sharded
from inilora_hf.factorsets.report import InitReport

from .log import get_logger

logger = get_logger(__name__)

EXPORT_DIR = "export"


def run_dir(args: TrainingArguments, state: TrainerState) -> Path:
    """The directory holding this run's `checkpoint-N` folders (per trial under hyper-parameter search).

    `Trainer` uses `output_dir/<hp_name(trial)>` (recorded as `state.trial_name`) or `output_dir/run-<id>`;
    in the second case the most recently written trial folder that holds the current checkpoint is taken.
    """
    root = _output_dir(args)
    if state.trial_name:
        return root / state.trial_name
    if state.trial_params is None:
        return root
    name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    candidates = [path.parent for path in root.glob(f"*/{name}") if path.is_dir()]
    return max(candidates, key=lambda path: (path / name).stat().st_mtime) if candidates else root


def _output_dir(args: TrainingArguments) -> Path:
    """`args.output_dir`, which `TrainingArguments.__post_init__` sets when not given (`"trainer_output"`)."""
    assert args.output_dir is not None, "TrainingArguments.__post_init__ sets output_dir"
    return Path(args.output_dir)


class ExportCallback(TrainerCallback):
    """Write standard checkpoints next to every Trainer checkpoint and into the final output directory.

    `checkpoint-N/export/merged/` loads with `AutoModelForCausalLM.from_pretrained`, and
    `checkpoint-N/export/lora/` with `PeftModel.from_pretrained(original_base, ...)`; the same two folders
    are written to `output_dir/export/` when training ends. Only the world process zero writes (under FSDP or
    DeepSpeed ZeRO-3 every rank takes part in gathering the shards).

    Args:
        merged: Write the merged checkpoint (`inilora_hf.convert.to_merged`).
        lora: Write the standard LoRA adapter (`inilora_hf.convert.to_lora`).
        dtype: Dtype of the merged weights (default: the base model's).
        at_checkpoints: Export into each `checkpoint-N` (otherwise only at the end).

    Example:
        >>> trainer = Trainer(model_init=inilora_init("./base"), args=args, train_dataset=ds,   # doctest: +SKIP
        ...                   callbacks=[ExportCallback(merged=True, lora=True)])
    """

    def __init__(
        self, *, merged: bool = True, lora: bool = True, dtype: Any = None, at_checkpoints: bool = True
    ) -> None:
        if not (merged or lora):
            raise ValueError("ExportCallback with merged=False and lora=False exports nothing; enable one of them.")
        self.merged = merged
        self.lora = lora
        self.dtype = dtype
        self.at_checkpoints = at_checkpoints

    def export(self, model: Any, directory: str | os.PathLike, *, tokenizer: Any = None) -> Path:
        """Write `directory/export/merged` and/or `directory/export/lora` (replacing older exports)."""
        target = Path(directory) / EXPORT_DIR
        if self.merged:
            to_merged(model, target / "merged", dtype=self.dtype, tokenizer=tokenizer, overwrite=True)
        if self.lora:
            to_lora(model, target / "lora", overwrite=True)
        return target

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not (self.at_checkpoints and _takes_part(state, kwargs["model"])):
            return
        checkpoint = run_dir(args, state) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not checkpoint.is_dir():
            logger.warning("ExportCallback: checkpoint folder %s not found; nothing exported.", checkpoint)
            return
        self.export(kwargs["model"], checkpoint, tokenizer=kwargs.get("processing_class"))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if _takes_part(state, kwargs["model"]):
            self.export(kwargs["model"], run_dir(args, state), tokenizer=kwargs.get("processing_class"))


def _takes_part(state: TrainerState, model: Any) -> bool:
    """Whether this process runs an export: world process zero; under FSDP or DeepSpeed ZeRO-3 every rank, since the
    export gathers the shards from all of them (rank 0 alone writes)."""
    return state.is_world_process_zero or (isinstance(model, nn.Module) and is_sharded(model))


def init_report_metrics(report: InitReport) -> dict[str, float]:
    """Flat scalar metrics of an init report, named `init/...`, for trainer loggers.

    Example:
        >>> init_report_metrics(model.init_report)["init/max_reconstruction_error"]   # doctest: +SKIP
        3.7e-09
    """
    modules = report.modules
    metrics = {
        "init/max_reconstruction_error": float(report.max_reconstruction_error),
        "init/mean_reconstruction_rel": _mean([m.reconstruction_rel for m in modules]),
        "init/rank": _mean([float(m.rank) for m in modules]) if modules else float(report.rank),
        "init/rank_min": float(report.rank_range[0]),
        "init/rank_max": float(report.rank_range[1]),
        "init/scaling": _mean([m.scaling for m in modules]) if modules else float(report.scaling),
        "init/scaling_min": float(report.scaling_range[0]),
        "init/scaling_max": float(report.scaling_range[1]),
        "init/residual": float(report.residual),
        "init/modules": float(len(modules)),
    }
    mse = [m.mse for m in modules if m.mse is not None]
    ratio = [m.mse_ratio for m in modules if m.mse_ratio is not None]
    if mse:
        metrics["init/mean_fit_mse"] = _mean(mse)
    if ratio:
        metrics["init/mean_mse_ratio"] = _mean(ratio)
        metrics["init/max_mse_ratio"] = float(max(ratio))
    qlora: list[float] = [error for m in modules if (error := getattr(m, "qlora_error", None)) is not None]
    if qlora:  # bitsandbytes bases: plain QLoRA's starting error, next to reconstruction_rel
        metrics["init/mean_qlora_error"] = _mean(qlora)
    return metrics


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


class InitReportCallback(TrainerCallback):
    """Log the model's init report (`init/max_reconstruction_error`, `init/mean_mse_ratio`, ...) at train begin.

    Give it the trainer so the metrics go through `trainer.log`: they then reach `trainer.state.log_history`
    and every `report_to` logger (TensorBoard, W&B, ...), like the loss. Without a trainer they are only
    appended to `state.log_history` and written to the `inilora_hf` logger.

    Args:
        trainer: The `Trainer` / `SFTTrainer` this callback is added to.

    Example:
        >>> trainer = SFTTrainer(model_init=inilora_init("./base"), args=args, train_dataset=ds)   # doctest: +SKIP
        >>> trainer.add_callback(InitReportCallback(trainer))                                     # doctest: +SKIP
    """

    def __init__(self, trainer: Any = None) -> None:
        self.trainer = trainer

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        report = getattr(kwargs.get("model"), "init_report", None)
        if not isinstance(report, InitReport):
            logger.warning(
                "InitReportCallback: the model has no `init_report` (not built by inilora_init); nothing logged."
            )
            return
        if state.is_world_process_zero:
            logger.info("%s", report.summary())
        metrics = init_report_metrics(report)
        if self.trainer is not None:
            self.trainer.log(metrics)
        elif state.is_world_process_zero:
            state.log_history.append({**metrics, "step": state.global_step})


class PushStandardCheckpointCallback(TrainerCallback):
    """At train end, push the merged checkpoint and/or the standard LoRA adapter to the Hub, with model cards.

    Runs only when `args.push_to_hub` is set, on the world process zero. `args.hub_model_id` receives the
    trainer's own pushes (the raw adapter with inilora_hf metadata), so the standard checkpoints go to their
    own repos: `<hub_model_id>-merged` (library `transformers`) and `<hub_model_id>-lora` (library `peft`),
    unless named explicitly (without `hub_model_id`, the output directory's name in the token owner's
    namespace, as `Trainer` does). Uses `args.hub_token` and `args.hub_private_repo`.

    Args:
        merged: Push the merged checkpoint.
        lora: Push the standard LoRA adapter.
        merged_repo_id: Repo for the merged checkpoint (default `<hub_model_id>-merged`).
        lora_repo_id: Repo for the adapter (default `<hub_model_id>-lora`).
        factors: Push the run's factor set (with its own model card and `init_adapter/`) so that others can
            start from the same init; skipped when the factor set was itself pulled from the Hub.
        factors_repo_id: Repo for the factor set (default `<hub_model_id>-factors`).
        dtype: Dtype of the merged weights (default: the base model's).
        endpoint: Hub endpoint (default: `HF_ENDPOINT` / huggingface.co).

    Example:
        >>> args = TrainingArguments("out", push_to_hub=True, hub_model_id="me/llama-inilora")   # doctest: +SKIP
        >>> trainer = Trainer(model_init=init, args=args, train_dataset=ds,                        # doctest: +SKIP
        ...                   callbacks=[PushStandardCheckpointCallback()])
        >>> trainer.train()   # pushes me/llama-inilora-merged and me/llama-inilora-lora          # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        merged: bool = True,
        lora: bool = True,
        merged_repo_id: str | None = None,
        lora_repo_id: str | None = None,
        factors: bool = True,
        factors_repo_id: str | None = None,
        dtype: Any = None,
        endpoint: str | None = None,
    ) -> None:
        if not (merged or lora):
            raise ValueError("PushStandardCheckpointCallback with merged=False and lora=False pushes nothing.")
        self.merged = merged
        self.lora = lora
        self.merged_repo_id = merged_repo_id
        self.lora_repo_id = lora_repo_id
        self.factors = factors
        self.factors_repo_id = factors_repo_id
        self.dtype = dtype
        self.endpoint = endpoint
        self.pushed: dict[str, str] = {}

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs["model"]
        if not (args.push_to_hub and _takes_part(state, model)):
            return
        if not state.is_world_process_zero:  # FSDP: take part in the gathers of the exports that rank 0 pushes
            with tempfile.TemporaryDirectory(prefix="inilora-push-") as tmp:
                if self.merged:
                    to_merged(model, Path(tmp) / "merged", dtype=self.dtype)
                if self.lora:
                    to_lora(model, Path(tmp) / "lora")
            return
        # Trainer itself defaults to a repo named after the output directory, in the token owner's namespace.
        stem = args.hub_model_id or _output_dir(args).absolute().name
        api = HfApi(endpoint=self.endpoint, token=args.hub_token)
        private = getattr(args, "hub_private_repo", None)
        factor_set = model.factor_set
        if self.factors and not factor_set.info.get("source_repo"):
            repo_id = self.factors_repo_id or f"{stem}-factors"
            commit = factor_set.push_to_hub(repo_id, private=private, token=args.hub_token, endpoint=api.endpoint)
            # From now on the run's cards (and later saves) reference the shared factor set.
            factor_set.info.update(source_repo=commit.repo_url.repo_id, source_revision=commit.oid)
            self.pushed["factors"] = commit.repo_url.repo_id
        with tempfile.TemporaryDirectory(prefix="inilora-push-") as tmp:
            if self.merged:
                repo_id = self.merged_repo_id or f"{stem}-merged"
                folder = to_merged(
                    model, Path(tmp) / "merged", dtype=self.dtype, tokenizer=kwargs.get("processing_class")
                )
                self.pushed["merged"] = self._push(api, repo_id, folder, kind="merged", private=private)
            if self.lora:
                repo_id = self.lora_repo_id or f"{stem}-lora"
                folder = to_lora(model, Path(tmp) / "lora")
                self.pushed["lora"] = self._push(api, repo_id, folder, kind="lora", private=private)

    def _push(self, api: HfApi, repo_id: str, folder: Path, *, kind: str, private: bool | None) -> str:
        """Upload an export folder (its README.md model card, written by `to_merged` / `to_lora`, included)."""
        repo_id = api.create_repo(repo_id, exist_ok=True, private=private).repo_id
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=f"Upload {kind} checkpoint (inilora_hf standard export)"
        )
        logger.info("Pushed the %s checkpoint to %s (%s).", kind, repo_id, commit.oid)
        return repo_id
