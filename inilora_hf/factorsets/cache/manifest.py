"""Entry manifests: :data:`MANIFEST_NAME` lists the size and sha256 of every file of a directory, so that
truncation and bit flips are caught on every read (:func:`verify_manifest`), and its presence marks the
directory as complete (:func:`write_manifest` writes it last, durably; its docstring has an example).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

from .fs import fsync_dir, fsync_fd

__all__ = ["MANIFEST_FORMAT", "MANIFEST_NAME", "CacheEntryCorruptError", "verify_manifest", "write_manifest"]

#: Name of the manifest file written inside every cache entry.  Its presence marks
#: the entry as complete; it lists the size and sha256 of every other file.
MANIFEST_NAME = ".inilora_manifest.json"
#: Value of the ``"format"`` field of manifests written by this module.
MANIFEST_FORMAT = "inilora_hf.cache.manifest/1"

_CHUNK = 4 * 1024 * 1024


class CacheEntryCorruptError(ValueError):
    """A cache (or factor-set) directory does not match its manifest.

    The message names the offending file and what is wrong with it (missing,
    size mismatch, checksum mismatch, missing/unreadable manifest).

    Example:
        >>> from inilora_hf.factorsets.cache import CacheEntryCorruptError, verify_manifest
        >>> try:
        ...     verify_manifest("/nonexistent/dir")
        ... except CacheEntryCorruptError as err:
        ...     print("corrupt:", type(err).__name__)
        corrupt: CacheEntryCorruptError
    """


def _sha256_and_size(path: Path, *, fsync: bool = False) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            digest.update(chunk)
        if fsync:
            fsync_fd(fh.fileno())
    return digest.hexdigest(), size


def _iter_files(directory: Path) -> list[tuple[str, Path]]:
    """All regular files under ``directory`` (recursive) except the manifest, sorted."""
    files: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(directory).as_posix()
            if rel == MANIFEST_NAME:
                continue
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode):
                raise ValueError(
                    f"{full} is a symlink; cache entries must contain regular files only "
                    "(copy or move the data instead of linking it)."
                )
            if not stat.S_ISREG(mode):
                raise ValueError(f"{full} is not a regular file; cannot add it to a manifest.")
            files.append((rel, full))
        for name in dirnames:
            if os.path.islink(Path(dirpath) / name):
                raise ValueError(f"{Path(dirpath) / name} is a symlinked directory; not allowed in a cache entry.")
    return files


def write_manifest(directory: str | Path, *, fsync: bool = True, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write :data:`MANIFEST_NAME` into ``directory`` listing every file's size and sha256.

    Files in sub-directories are included (relative POSIX paths).  Any existing
    manifest is overwritten.  With ``fsync=True`` every file, the manifest and the
    directories are fsync'ed so the entry is durable before it is published.
    ``extra`` is stored verbatim under the ``"extra"`` field.  Returns the manifest.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "a.txt").write_text("hi")
        >>> sorted(write_manifest(d)["files"])
        ['a.txt']
        >>> verify_manifest(d)
    """
    directory = Path(directory)
    entries: dict[str, dict[str, Any]] = {}
    for rel, full in _iter_files(directory):
        sha, size = _sha256_and_size(full, fsync=fsync)
        entries[rel] = {"size": size, "sha256": sha}
    manifest: dict[str, Any] = {"format": MANIFEST_FORMAT, "created": time.time(), "files": entries}
    if extra is not None:
        manifest["extra"] = extra
    target = directory / MANIFEST_NAME
    tmp = directory / f"{MANIFEST_NAME}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
        fh.flush()
        if fsync:
            fsync_fd(fh.fileno())
    os.replace(tmp, target)
    if fsync:
        for dirpath, _dirnames, _filenames in os.walk(directory):
            fsync_dir(Path(dirpath))
    return manifest


def _safe_rel(rel: Any, directory: Path) -> Path:
    if not isinstance(rel, str) or not rel:
        raise CacheEntryCorruptError(f"Manifest {directory / MANIFEST_NAME} lists an invalid file name {rel!r}.")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or "\\" in rel:
        raise CacheEntryCorruptError(
            f"Manifest {directory / MANIFEST_NAME} lists {rel!r}, which points outside the directory."
        )
    return directory.joinpath(*pure.parts)


def verify_manifest(directory: str | Path, *, check_hashes: bool = True) -> None:
    """Check that ``directory`` matches its :data:`MANIFEST_NAME`.

    Raises :class:`CacheEntryCorruptError` naming the file and the problem if the
    manifest is missing or unreadable, or a listed file is missing, not a regular
    file, has the wrong size, or (with ``check_hashes=True``, the default) the
    wrong sha256.  Files not listed in the manifest are ignored.  Files are read in
    4 MiB chunks; hashing costs roughly one sequential read of the entry.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "w.bin").write_bytes(b"1234")
        >>> _ = write_manifest(d)
        >>> _ = (d / "w.bin").write_bytes(b"12")
        >>> try:
        ...     verify_manifest(d)
        ... except CacheEntryCorruptError as err:
        ...     print("size mismatch" in str(err))
        True
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise CacheEntryCorruptError(f"{directory} is not a directory.")
    try:
        raw = manifest_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CacheEntryCorruptError(
            f"{manifest_path} is missing: the directory is incomplete (interrupted write or partial copy)."
        ) from None
    except OSError as err:
        raise CacheEntryCorruptError(f"Cannot read manifest {manifest_path}: {err}") from err
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as err:
        raise CacheEntryCorruptError(f"Manifest {manifest_path} is not valid JSON: {err}") from err
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CacheEntryCorruptError(f"Manifest {manifest_path} has no 'files' mapping.")
    for rel, info in sorted(files.items()):
        path = _safe_rel(rel, directory)
        if (
            not isinstance(info, dict)
            or not isinstance(info.get("size"), int)
            or not isinstance(info.get("sha256"), str)
        ):
            raise CacheEntryCorruptError(f"Manifest {manifest_path} has a malformed record for {rel!r}: {info!r}")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise CacheEntryCorruptError(f"{path} is missing (listed in {manifest_path}).") from None
        except OSError as err:
            raise CacheEntryCorruptError(f"Cannot stat {path}: {err}") from err
        if not stat.S_ISREG(st.st_mode):
            raise CacheEntryCorruptError(f"{path} is not a regular file.")
        if st.st_size != info["size"]:
            raise CacheEntryCorruptError(
                f"{path}: size mismatch (expected {info['size']} bytes, found {st.st_size}); "
                "the file is truncated or was modified."
            )
        if check_hashes:
            try:
                sha, _size = _sha256_and_size(path)
            except OSError as err:
                raise CacheEntryCorruptError(f"Cannot read {path}: {err}") from err
            if sha != info["sha256"]:
                raise CacheEntryCorruptError(
                    f"{path}: sha256 checksum mismatch (expected {info['sha256']}, found {sha}); the file is corrupt."
                )
