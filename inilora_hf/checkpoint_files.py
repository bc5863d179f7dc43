"""Where a model's weights live on disk: its local or Hub-cache directory and its safetensors files.

Used by the streamed computation (which reads tensors straight from the files) and by the fingerprint memo
(which identifies a checkpoint by its files' stat information).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open

from .hub import snapshot_commit

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def _hub_id_shaped(text: str) -> bool:
    """`name` or `org/name`: not an absolute, relative (`./`, `../`) or home (`~`) path, at most one slash."""
    return not (Path(text).is_absolute() or text.startswith((".", "~")) or text.count("/") > 1)


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
    if path.exists() or not _hub_id_shaped(text):
        raise FileNotFoundError(
            f"No checkpoint directory {text!r}. Pass an existing directory or a Hub model id ('org/name')."
        )
    from huggingface_hub import snapshot_download

    snapshot = Path(
        snapshot_download(text, revision=revision, token=token, allow_patterns=["*.json", "*.safetensors"])
    )
    return snapshot, snapshot_commit(snapshot) or revision


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
            return {key: single for key in handle.keys()}
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
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(text, "config.json", cache_dir=cache_dir, revision=revision)
    return Path(config).parent if isinstance(config, str) else None
