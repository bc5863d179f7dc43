"""Remembered base-weight fingerprints, so that a cache hit does not hash the checkpoint again.

A cache lookup needs the sha256 of every target weight (it keys the entry): a full extra read of each target
matrix after the load, which on a lazily (mmap) loaded model costs several times the load itself. When the
model comes from safetensors files (a local directory, or a snapshot in the Hub cache), the fingerprints are
remembered in `<cache_dir>/.fingerprints/`, filed under the identity of those files: the resolved path, size,
inode, mtime and ctime (ns) of every weight file, plus the transformers version. A later load of the same,
unchanged files reuses them after a spot check: the sha256 of a few rows of each loaded weight must equal the
recorded one. Rewriting, replacing or even `touch`-ing a file changes its ctime, so its weights are hashed
again.

Only plain loads are remembered: a loaded `nn.Module`, quantized loads (`quantization_config`), and
`from_pretrained` arguments that could change the weights without touching the files (`subfolder`, `state_dict`,
remote code, ...) always hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeGuard

import torch
import transformers
from torch import nn

from inilora_hf.log import get_logger

from .cache import default_cache_dir
from .checkpoint_files import cached_checkpoint_dir, checkpoint_files
from .fingerprint import tensor_sha256, weight_fingerprint
from .targets import layout_of

logger = get_logger(__name__)

MEMO_DIR = ".fingerprints"
MEMO_FORMAT = 1
#: Rows of each weight hashed on a memo hit (evenly spaced, first and last included).
SPOT_ROWS = 8
#: `from_pretrained` arguments that cannot change the loaded weights' values (dtype is recorded per weight).
SAFE_LOAD_ARGUMENTS = frozenset(
    {"dtype", "torch_dtype", "device_map", "attn_implementation", "token", "local_files_only", "cache_dir", "revision"}
)


def checkpoint_identity(
    model: Any, *, revision: str | None = None, model_kwargs: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The stat identity of the safetensors files `from_pretrained(model, **model_kwargs)` reads, or None when
    the load is not one whose fingerprints may be remembered (see the module docstring).

    Example:
        >>> checkpoint_identity("/nonexistent/org/model") is None
        True
    """
    model_kwargs = model_kwargs or {}
    revision = model_kwargs.get("revision", revision)  # as `InitFunction.load_base_model` passes it on
    if not isinstance(model, (str, os.PathLike)) or set(model_kwargs) - SAFE_LOAD_ARGUMENTS:
        return None
    directory = cached_checkpoint_dir(model, revision=revision, cache_dir=model_kwargs.get("cache_dir"))
    if directory is None:
        return None
    try:
        files = sorted({path.resolve() for path in checkpoint_files(directory).values()})
    except (OSError, ValueError):
        return None
    stats = []
    for path in files:
        status = path.stat()
        stats.append([str(path), status.st_size, status.st_ino, status.st_mtime_ns, status.st_ctime_ns])
    return {"files": stats, "transformers": transformers.__version__}


def spot_digest(weight: torch.Tensor) -> str:
    """sha256 of `SPOT_ROWS` evenly spaced rows of `weight` (raw bytes in its own dtype)."""
    rows = torch.linspace(0, weight.shape[0] - 1, min(SPOT_ROWS, weight.shape[0])).round().long().unique()
    return tensor_sha256(weight.detach()[rows.to(weight.device)])


def target_fingerprints(
    modules: Mapping[str, nn.Module],
    checkpoint: dict[str, Any] | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, dict[str, Any]]:
    """`weight_fingerprint` of every target module's weight, taken from the memo of `checkpoint` (an identity
    from `checkpoint_identity`, unchanged across the load) where it passes the spot check, hashed and
    remembered otherwise. With `checkpoint=None` every weight is hashed and nothing is remembered.

    Example:
        >>> fingerprints = target_fingerprints({"proj": nn.Linear(4, 4)})
        >>> sorted(fingerprints["proj"])
        ['dtype', 'sha256', 'shape', 'sketch']
    """
    if checkpoint is None:
        return {name: module_fingerprint(module) for name, module in modules.items()}
    path = _memo_path(checkpoint, cache_dir)
    records = _read_memo(path, checkpoint)
    fingerprints, fresh = {}, {}
    for name, module in modules.items():
        weight = module.get_parameter("weight").detach()
        slot = f"{name}|{str(weight.dtype).removeprefix('torch.')}"
        record, spot = records.get(slot), spot_digest(weight)
        if _matches(record, spot, weight) and record["fingerprint"].get("layout") == layout_of(module):
            fingerprints[name] = record["fingerprint"]
        else:
            fingerprints[name] = module_fingerprint(module)
            fresh[slot] = {"fingerprint": fingerprints[name], "spot": spot}
    if fresh:
        _write_memo(path, checkpoint, {**records, **fresh})
    logger.debug("Fingerprints: %d remembered, %d hashed (%s).", len(modules) - len(fresh), len(fresh), path)
    return fingerprints


def module_fingerprint(module: nn.Module) -> dict[str, Any]:
    """`weight_fingerprint` of a target layer's weight as stored, with its layout (Conv1D's `in × out`).

    Example:
        >>> module_fingerprint(nn.Linear(4, 2))["shape"]
        [2, 4]
    """
    return weight_fingerprint(module.get_parameter("weight").detach(), layout=layout_of(module))


def _matches(record: Any, spot: str, weight: torch.Tensor) -> TypeGuard[dict[str, Any]]:
    """A remembered record is used only if it is well-formed and its spot digest and shape match the weight."""
    if not isinstance(record, dict) or record.get("spot") != spot or not isinstance(record.get("fingerprint"), dict):
        return False
    fingerprint = record["fingerprint"]
    return fingerprint.get("shape") == list(weight.shape) and {"sha256", "sketch", "dtype"} <= set(fingerprint)


def _memo_path(checkpoint: dict[str, Any], cache_dir: str | os.PathLike | None) -> Path:
    digest = hashlib.sha256(json.dumps(checkpoint, sort_keys=True).encode()).hexdigest()[:32]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / MEMO_DIR / f"{digest}.json"


def _read_memo(path: Path, checkpoint: dict[str, Any]) -> dict[str, dict[str, Any]]:
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        logger.warning("Ignoring the unreadable fingerprint memo %s (%s); the weights are hashed again.", path, error)
        return {}
    if (
        not isinstance(document, dict)
        or document.get("format") != MEMO_FORMAT
        or document.get("checkpoint") != checkpoint
    ):
        return {}
    records = document.get("modules")
    return records if isinstance(records, dict) else {}


def _write_memo(path: Path, checkpoint: dict[str, Any], records: dict[str, dict[str, Any]]) -> None:
    """Atomic (temp file + rename); a failure only costs the memo, never the init."""
    document = {"format": MEMO_FORMAT, "checkpoint": checkpoint, "modules": records}
    tmp = path.with_name(f".tmp-{path.stem}-{os.getpid()}-{uuid.uuid4().hex}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(document))
        os.replace(tmp, path)
    except OSError as error:
        logger.warning("Could not write the fingerprint memo %s: %s.", path, error)
        tmp.unlink(missing_ok=True)
