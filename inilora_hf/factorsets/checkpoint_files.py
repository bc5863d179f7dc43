"""Where a model's weights live: its local or Hub-cache directory, its safetensors files, and loading it.

Used by the streamed computation (which locates and reads target tensors straight from the files), by the
fingerprint memo (which identifies a checkpoint by its files' stat information), and by everything that loads a
base model (`load_pretrained`: a missing directory, repo or revision, or an offline cache miss, raises
`BaseModelNotFoundError` naming the model and the fix).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants, snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import safe_open

from inilora_hf.errors import BaseModelNotFoundError
from inilora_hf.hub.transport import snapshot_commit

from .targets import CONV1D_LAYOUT, peft_default_targets

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def _hub_id_shaped(text: str) -> bool:
    """`name` or `org/name`: not an absolute, relative (`./`, `../`) or home (`~`) path, at most one slash."""
    return not (Path(text).is_absolute() or text.startswith((".", "~")) or text.count("/") > 1)


def model_reference(model: str | os.PathLike) -> str:
    """How to name `model` so that it loads from any working directory: a local directory as its absolute path,
    anything else (a Hub id) unchanged. This is what `from_pretrained(model)` reads, resolved now.

    Example:
        >>> model_reference("meta-llama/Llama-3.2-1B")
        'meta-llama/Llama-3.2-1B'
        >>> os.path.isabs(model_reference("."))
        True
    """
    path = os.path.expanduser(os.fspath(model))
    return os.path.abspath(path) if os.path.isdir(path) else os.fspath(model)


def check_model_location(model: str | os.PathLike) -> None:
    """Raise `BaseModelNotFoundError` when `model` is written as a path (absolute, `./`, `../`, `~`, or with more
    than one `/`) but is not a directory. Hub ids are checked when they are loaded.

    Example:
        >>> check_model_location("org/name")         # a Hub id: checked on load
        >>> check_model_location("./no_such_model")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        inilora_hf.errors.BaseModelNotFoundError: No checkpoint directory './no_such_model' ...
    """
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.is_dir() or _hub_id_shaped(text):
        return
    what = "is a file, not a model directory" if path.exists() else "does not exist"
    raise BaseModelNotFoundError(
        f"No checkpoint directory {text!r}: {path.absolute()} {what}. Pass a directory holding the model's config.json "
        "and weights (as written by `save_pretrained`), or a Hub model id ('org/name')."
    )


def load_pretrained(model_class: Any, model: str | os.PathLike, **kwargs: Any) -> Any:
    """`model_class.from_pretrained(model, **kwargs)`, where a missing local directory, Hub repo or revision, a
    gated repo, or an offline cache miss raises `BaseModelNotFoundError` naming the model and the fix.

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> base = load_pretrained(AutoModelForCausalLM, "./base", dtype="bfloat16")   # doctest: +SKIP
    """
    check_model_location(model)
    name = os.fspath(model)
    with base_model_errors(name, revision=kwargs.get("revision")):
        # transformers does not expand `~`; check_model_location has made sure such a path is a directory
        return model_class.from_pretrained(os.path.expanduser(name) if name.startswith("~") else name, **kwargs)


@contextlib.contextmanager
def base_model_errors(model: str, *, revision: str | None = None) -> Iterator[None]:
    """Re-raise a failure to find base model `model` (a huggingface_hub error, also when transformers wraps it in
    an `OSError`) as `BaseModelNotFoundError` naming the model, the revision and the fix. Other errors pass."""
    try:
        yield
    except BaseModelNotFoundError:
        raise
    except (OSError, ValueError) as error:
        message = _base_model_problem(model, revision, _hub_cause(error))
        if message is None:
            raise
        raise BaseModelNotFoundError(message) from error


def _hub_cause(error: BaseException) -> BaseException | None:
    """The huggingface_hub error in `error`'s chain that says why a model was not found, if any."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(
            current,
            (
                HFValidationError,
                RepositoryNotFoundError,
                RevisionNotFoundError,
                LocalEntryNotFoundError,
                OfflineModeIsEnabled,
            ),
        ):
            return current
        current = current.__cause__ or current.__context__
    return None


def _base_model_problem(model: str, revision: str | None, cause: BaseException | None) -> str | None:
    endpoint = constants.ENDPOINT
    if isinstance(cause, HFValidationError):
        return (
            f"Base model {model!r} is neither an existing directory nor a valid Hub model id ('org/name'). Pass the "
            "directory of a saved model or a Hub id."
        )
    if isinstance(cause, GatedRepoError):
        return (
            f"Base model {model!r} on {endpoint} is gated: accept its conditions on the model page, then pass a token "
            "with access (HF_TOKEN or `hf auth login`)."
        )
    if isinstance(cause, RepositoryNotFoundError):
        return (
            f"Base model {model!r} is not a local directory and was not found on {endpoint}. Check the id; for a "
            "private repo log in (`hf auth login` or HF_TOKEN); or pass the path of a local copy."
        )
    if isinstance(cause, RevisionNotFoundError):
        return (
            f"Base model {model!r} has no revision {revision or 'main'!r} on {endpoint}. Pass an existing branch, "
            "tag or commit sha as `revision=`."
        )
    if isinstance(cause, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        offline = (
            "offline mode is on (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else f"{endpoint} cannot be reached"
        )
        return (
            f"Base model {model!r} (revision {revision or 'main'!r}) is not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and {offline}. Download it once while online (`hf download {model}`), "
            "or pass the path of a local copy."
        )
    return None


def resolve_checkpoint(
    base: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None
) -> tuple[Path, str | None]:
    """A local directory holding `base`'s config and safetensors, and the resolved commit when from the Hub.

    A local directory is used as is (its revision is `revision`, as given). Anything else is a Hub id, of which
    only `*.json` and `*.safetensors` are downloaded.

    Example:
        >>> directory, commit = resolve_checkpoint("meta-llama/Llama-2-7b-hf")      # doctest: +SKIP
    """
    path = Path(base).expanduser()
    if path.is_dir():
        return path, revision
    text = str(base)
    check_model_location(text)
    with base_model_errors(text, revision=revision):
        snapshot = Path(
            snapshot_download(text, revision=revision, token=token, allow_patterns=["*.json", "*.safetensors"])
        )
    return snapshot, snapshot_commit(snapshot) or revision


def checkpoint_default_targets(directory: Path) -> tuple[str, ...] | str:
    """PEFT's default `target_modules` for the checkpoint in `directory` (by its `config.json`'s `model_type`).

    Example:
        >>> checkpoint_default_targets(resolve_checkpoint("openai-community/gpt2")[0])      # doctest: +SKIP
        ('c_attn',)
    """
    config_file = directory / "config.json"
    model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
    return peft_default_targets(model_type)


def checkpoint_files(directory: Path) -> dict[str, Path]:
    """Tensor key → safetensors file, from `model.safetensors.index.json` (sharded) or `model.safetensors`.

    Raises:
        FileNotFoundError: there is no safetensors checkpoint in `directory`, or a shard the index lists is missing.
    """
    index_file = directory / SAFETENSORS_INDEX
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{index_file} is not a valid safetensors index (no 'weight_map'): {error}.") from error
        missing = sorted({name for name in weight_map.values() if not (directory / name).is_file()})
        if missing:
            raise FileNotFoundError(
                f"Shard {missing[0]!r} listed in {index_file} is missing from {directory}"
                f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}. "
                "Download or copy the checkpoint again."
            )
        return {key: directory / name for key, name in weight_map.items()}
    single = directory / SAFETENSORS_SINGLE
    if single.is_file():
        with safe_open(str(single), framework="pt") as handle:
            return dict.fromkeys(handle.keys(), single)
    raise FileNotFoundError(
        f"No {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} in {directory}: streamed computation reads safetensors "
        "checkpoints only. Re-save the model with `save_pretrained(..., safe_serialization=True)`, or use "
        "`inilora_init` (which loads the whole model)."
    )


def cached_checkpoint_dir(
    model: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Path | None:
    """The directory `from_pretrained(model, revision=...)` reads, without any network access: `model` itself
    when it is a local directory, else the Hub-cache snapshot it resolves to; None when not downloaded yet.

    Example:
        >>> cached_checkpoint_dir("/nonexistent/org/model") is None
        True
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    text = str(model)
    if not _hub_id_shaped(text):
        return None
    cache = Path(cache_dir) if cache_dir is not None else None
    config = try_to_load_from_cache(text, "config.json", cache_dir=cache, revision=revision)
    return Path(config).parent if isinstance(config, str) else None


@dataclass(frozen=True)
class TensorLocation:
    """Where one target weight is stored: a safetensors file and the tensor's key in it."""

    file: Path
    key: str
    layout: str | None  # `CONV1D_LAYOUT`: stored in × out (a Conv1D), else out × in

    def out_in(self, tensor: torch.Tensor) -> torch.Tensor:
        """The stored tensor as `(out, in)` (a transposed view for a Conv1D)."""
        return tensor.T if self.layout == CONV1D_LAYOUT else tensor


def locate_targets(
    shapes: Mapping[str, tuple[int, int]],
    files: Mapping[str, Path],
    prefix: str,
    layouts: Mapping[str, str | None],
) -> dict[str, TensorLocation]:
    """Module name → where its weight is stored: `name.weight`, else with the `base_model_prefix` removed or added."""
    locations = {}
    for name in shapes:
        candidates = [f"{name}.weight"]
        if prefix and name.startswith(f"{prefix}."):
            candidates.append(f"{name[len(prefix) + 1 :]}.weight")
        elif prefix:
            candidates.append(f"{prefix}.{name}.weight")
        key = next((key for key in candidates if key in files), None)
        if key is None:
            raise ValueError(
                f"The checkpoint has no tensor for target module {name!r} (looked for {candidates}). The files do "
                "not match the model's config, or use renamed keys; load it with `inilora_init` instead."
            )
        locations[name] = TensorLocation(files[key], key, layouts[name])
    return locations


def read_tensor(location: TensorLocation, shape: tuple[int, int]) -> torch.Tensor:
    """Read one weight in its stored dtype and layout (the file is memory-mapped only while reading) and check its
    `(out, in)` shape."""
    with safe_open(str(location.file), framework="pt", device="cpu") as handle:
        tensor = handle.get_tensor(location.key)
    if tuple(location.out_in(tensor).shape) != tuple(shape):
        raise ValueError(
            f"Tensor {location.key!r} in {location.file} has shape {tuple(tensor.shape)}, but the model's config "
            f"gives (out, in) = {tuple(shape)}. The weights and config.json of the checkpoint do not match."
        )
    if not tensor.is_floating_point():
        raise ValueError(
            f"Tensor {location.key!r} in {location.file} is {tensor.dtype} (quantized?); streamed computation needs "
            "floating-point weights. Use `inilora_init` with the matching `quantization_config`."
        )
    return tensor
