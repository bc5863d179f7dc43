"""Robust, process-safe local cache of *directory* entries.

Factor sets are expensive to compute (minutes to hours), so :func:`get_or_build`
stores each one as a directory ``<cache_dir>/<key>/`` and lets every later call
(Trainer re-inits, hyper-parameter-search trials, every rank of a multi-process
run) reuse it.  This module deals with one concern only: keys, atomic writes,
inter-process locks and corruption handling.  It knows nothing about what the
files contain; the caller provides ``build(dir)`` (writes the files) and,
optionally, ``validate(dir)`` (raises on a bad entry).

Guarantees:

* **Exactly one builder.**  A per-key lock file ``<cache_dir>/<key>.lock``
  (:func:`exclusive_lock`) serialises builders across processes and threads.
  Processes that arrive while another one is building block on the lock and then
  find the finished entry (``hit=True``) without building.  The lock file is
  removed when the lock is released, so lock files do not accumulate.
* **Atomic publication.**  ``build`` writes into a fresh temporary directory
  ``<cache_dir>/.tmp-<key>-<pid>-<uuid>`` on the same filesystem; a manifest
  (:data:`MANIFEST_NAME`, the size and sha256 of every file) is added, everything
  is fsync'ed, and the directory is renamed to ``<cache_dir>/<key>``.  A build
  that raises, or a process that is killed, never leaves a visible entry; stale
  temporary directories of a key are removed by the next lock holder.
* **No corrupt hits.**  Every hit re-checks the manifest (sizes and sha256, so
  truncation and bit flips are caught even without a ``validate`` callable) and
  then runs ``validate``.  A bad entry is logged, moved aside and rebuilt.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from inilora_hf.cache import get_or_build
    >>> def build(tmp: Path) -> None:
    ...     (tmp / "weights.bin").write_bytes(b"\\x00" * 16)
    >>> root = tempfile.mkdtemp()
    >>> first = get_or_build("demo-key", build, cache_dir=root)
    >>> second = get_or_build("demo-key", build, cache_dir=root)
    >>> (first.hit, second.hit, first.path == second.path)
    (False, True, True)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from filelock import FileLock

from inilora_hf.log import get_logger

logger = get_logger(__name__)

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_FORMAT",
    "CACHE_ENV_VAR",
    "CacheEntryCorruptError",
    "CacheLookup",
    "default_cache_dir",
    "entry_path",
    "exclusive_lock",
    "get_or_build",
    "remove",
    "resumable_dir",
    "verify_manifest",
    "write_manifest",
]

#: Name of the manifest file written inside every cache entry.  Its presence marks
#: the entry as complete; it lists the size and sha256 of every other file.
MANIFEST_NAME = ".inilora_manifest.json"
#: Value of the ``"format"`` field of manifests written by this module.
MANIFEST_FORMAT = "inilora_hf.cache.manifest/1"
#: Environment variable overriding the cache root (read at call time).
CACHE_ENV_VAR = "INILORA_HF_CACHE"

_KEY_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_MAX_KEY_LEN = 200  # leaves room for the ".tmp-<key>-<pid>-<uuid>" name within 255 bytes
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_PARTIAL_PREFIX = ".partial-"
_TMP_RE = re.compile(r"^\.tmp-(?P<key>.+)-(?P<pid>\d+)-(?P<uid>[0-9a-f]{32})$")
_TRASH_RE = re.compile(r"^\.trash-(?P<key>.+)-(?P<uid>[0-9a-f]{32})$")
_CHUNK = 4 * 1024 * 1024


class CacheEntryCorruptError(ValueError):
    """A cache (or factor-set) directory does not match its manifest.

    The message names the offending file and what is wrong with it (missing,
    size mismatch, checksum mismatch, missing/unreadable manifest).

    Example:
        >>> from inilora_hf.cache import CacheEntryCorruptError, verify_manifest
        >>> try:
        ...     verify_manifest("/nonexistent/dir")
        ... except CacheEntryCorruptError as err:
        ...     print("corrupt:", type(err).__name__)
        corrupt: CacheEntryCorruptError
    """


@dataclass
class CacheLookup:
    """Result of :func:`get_or_build`.

    Attributes:
        path: Directory of the (valid) cache entry, ``<cache_dir>/<key>``.
        hit: ``True`` if an existing entry was reused (possibly one that another
            process built while this call waited for the lock), ``False`` if this
            call ran ``build``.

    Example:
        >>> from pathlib import Path
        >>> CacheLookup(path=Path("/tmp/x"), hit=True).hit
        True
    """

    path: Path
    hit: bool


# --------------------------------------------------------------------------- paths


def default_cache_dir() -> Path:
    """Return the default cache root.

    ``$INILORA_HF_CACHE`` if set, else ``<HF_HOME>/inilora``, where ``HF_HOME`` is
    resolved *at call time* with the same logic as ``huggingface_hub.constants``
    (``$HF_HOME``, else ``$XDG_CACHE_HOME/huggingface``, else
    ``~/.cache/huggingface``; ``~`` and ``$VARS`` expanded).  The directory is not
    created.

    Example:
        >>> import os
        >>> saved = dict(os.environ)
        >>> os.environ["INILORA_HF_CACHE"] = "/tmp/my-inilora-cache"
        >>> str(default_cache_dir())
        '/tmp/my-inilora-cache'
        >>> os.environ.clear(); os.environ.update(saved)
    """
    override = os.environ.get(CACHE_ENV_VAR)
    if override:
        return Path(os.path.expandvars(os.path.expanduser(override)))
    default_home = os.path.join(os.path.expanduser("~"), ".cache")
    hf_home = os.path.expandvars(
        os.path.expanduser(
            os.getenv("HF_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", default_home), "huggingface"))
        )
    )
    return Path(hf_home) / "inilora"


def _validate_key(key: str) -> str:
    if not isinstance(key, str):
        raise ValueError(f"Cache key must be a str, got {type(key).__name__}: {key!r}")
    problem = None
    if not key:
        problem = "it is empty"
    elif "/" in key or "\\" in key or os.sep in key or (os.altsep and os.altsep in key):
        problem = "it contains a path separator"
    elif ".." in key:
        problem = "it contains '..'"
    elif not _KEY_RE.match(key):
        problem = "only the characters [A-Za-z0-9._-] are allowed"
    elif key.startswith("."):
        problem = "keys starting with '.' are reserved for internal files"
    elif key.endswith(".lock"):
        problem = "keys ending in '.lock' would clash with lock files"
    elif len(key) > _MAX_KEY_LEN:
        problem = f"it is longer than {_MAX_KEY_LEN} characters"
    if problem is not None:
        raise ValueError(f"Invalid cache key {key!r}: {problem}.")
    return key


def _root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def entry_path(key: str, cache_dir: str | Path | None = None) -> Path:
    """Return where the entry for ``key`` lives (``<cache_dir>/<key>``); it may not exist.

    Example:
        >>> entry_path("abc", "/tmp/cache").as_posix()
        '/tmp/cache/abc'
    """
    return _root(cache_dir) / _validate_key(key)


def _lock_path(root: Path, key: str) -> Path:
    return root / f"{key}.lock"


def _partial_path(root: Path, key: str) -> Path:
    return root / f"{_PARTIAL_PREFIX}{key}"


def resumable_dir(key: str, *, cache_dir: str | Path | None = None, create: bool = True) -> Path:
    """Return (creating it unless ``create=False``) a persistent work dir ``<cache_dir>/.partial-<key>/``.

    Long computations can store finished chunks there so that an interrupted run
    resumes instead of starting over.  It survives failed or killed builds and is
    deleted by :func:`get_or_build` after a successful build of the same ``key``
    (and by :func:`remove`).  Write to it only from inside the ``build`` callable
    of :func:`get_or_build` (i.e. while holding the key's lock), so that
    concurrent processes never write the same chunk.  Files needed in the entry
    must be moved or copied into the build directory (do not symlink: the work
    dir is deleted afterwards).

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> def build(tmp):
        ...     work = resumable_dir("k", cache_dir=root)
        ...     chunk = work / "group-000.bin"
        ...     if not chunk.exists():
        ...         chunk.write_bytes(b"expensive")
        ...     os.replace(chunk, tmp / chunk.name)
        >>> get_or_build("k", build, cache_dir=root).hit
        False
        >>> (Path(root) / ".partial-k").exists()
        False
    """
    path = _partial_path(_root(cache_dir), _validate_key(key))
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def exclusive_lock(path: str | Path, *, timeout: float = -1) -> Iterator[None]:
    """Hold an inter-process lock on the file ``path``, and remove that file before releasing the lock.

    Lock files therefore do not pile up (one per cache key or work dir would otherwise stay behind forever).
    Removing a lock file that other processes may be waiting on is safe because it is removed only by its
    holder, while holding it, and because filelock never keeps a lock it obtained on a file that is no longer
    linked (``st_nlink == 0``): such a waiter retries on the file now at ``path``, so it cannot hold the removed
    file while a newcomer holds its replacement. This needs filelock 3.30 or later: 3.21 to 3.29 also remove
    the file in their own release, which could then remove a newcomer's file. (On Windows an open file cannot
    be removed; filelock removes it there itself after releasing.)

    Args:
        path: The lock file (created if missing, like its parent directory).
        timeout: Seconds to wait; ``-1`` waits forever.  On expiry :class:`filelock.Timeout` is raised and
            nothing is removed.

    Example:
        >>> import tempfile
        >>> lock_file = Path(tempfile.mkdtemp()) / "work.lock"
        >>> with exclusive_lock(lock_file):
        ...     lock_file.exists()
        True
        >>> lock_file.exists()
        False
    """
    with FileLock(str(path), timeout=timeout):
        try:
            yield
        finally:
            with suppress(OSError):  # removed already, or Windows (see above)
                os.unlink(path)


# ------------------------------------------------------------------------ manifest


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
            _fsync_fd(fh.fileno())
    return digest.hexdigest(), size


def _fsync_fd(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError:  # e.g. read-only handles on Windows; best effort
        pass


def _fsync_dir(path: Path) -> None:
    """fsync a directory so that renames/creations in it are durable (POSIX only)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        _fsync_fd(fd)
    finally:
        os.close(fd)


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
            _fsync_fd(fh.fileno())
    os.replace(tmp, target)
    if fsync:
        for dirpath, _dirnames, _filenames in os.walk(directory):
            _fsync_dir(Path(dirpath))
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
        if not isinstance(info, dict) or not isinstance(info.get("size"), int) or not isinstance(info.get("sha256"), str):
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


# -------------------------------------------------------------------- housekeeping


def _rmtree(path: Path) -> None:
    def _onerror(func: Callable[..., Any], p: str, exc: BaseException) -> None:
        # Retry after making the path writable (read-only files on Windows); otherwise ignore.
        try:
            os.chmod(p, stat.S_IWRITE | stat.S_IREAD | stat.S_IEXEC)
            func(p)
        except OSError:
            logger.debug("Could not remove %s: %s", p, exc)

    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            if sys.version_info >= (3, 12):
                shutil.rmtree(path, onexc=_onerror)
            else:
                shutil.rmtree(path, onerror=lambda f, p, e: _onerror(f, p, e[1]))
    except FileNotFoundError:
        pass
    except OSError as err:
        logger.warning("Could not remove %s: %s", path, err)


def _discard(path: Path, root: Path, key: str) -> None:
    """Atomically hide ``path`` (rename to a trash name), then delete it.

    Renaming first means readers never observe a half-deleted entry.
    """
    trash = root / f"{_TRASH_PREFIX}{key}-{uuid.uuid4().hex}"
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return
    except OSError as err:  # e.g. Windows with open handles: fall back to in-place deletion
        logger.debug("Could not rename %s aside (%s); deleting in place.", path, err)
        _rmtree(path)
        return
    _rmtree(trash)


def _clean_stale(root: Path, key: str) -> None:
    """Remove leftover temp/trash dirs of ``key``. Call only while holding the key's lock."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        m = _TMP_RE.match(name) or _TRASH_RE.match(name)
        if m is not None and m.group("key") == key:
            logger.info("Removing stale cache temp directory %s (interrupted build of key %r).", root / name, key)
            _rmtree(root / name)


def _check_entry(path: Path, validate: Callable[[Path], None] | None, check_hashes: bool) -> Exception | None:
    """Return ``None`` if ``path`` is a valid entry, else the exception explaining why not."""
    try:
        verify_manifest(path, check_hashes=check_hashes)
        if validate is not None:
            validate(path)
    except Exception as err:  # noqa: BLE001 - any validation failure means "do not use"
        return err
    return None


# ---------------------------------------------------------------------------- API


def get_or_build(
    key: str,
    build: Callable[[Path], None],
    *,
    cache_dir: str | Path | None = None,
    validate: Callable[[Path], None] | None = None,
    lock_timeout: float = -1,
    check_hashes: bool = True,
) -> CacheLookup:
    """Return the cache entry for ``key``, building it with ``build`` if needed.

    Args:
        key: Filesystem-safe name made by the caller (``[A-Za-z0-9._-]``, no
            ``..``, not starting with ``.``, not ending with ``.lock``, at most
            200 characters); :class:`ValueError` otherwise.
        build: ``build(tmp_dir)`` writes the entry's files into the existing,
            empty ``tmp_dir`` (regular files, sub-directories allowed, no
            symlinks).  It runs while holding the key's lock, in the calling
            process.  It must not call :func:`get_or_build` for the same key.
        cache_dir: Cache root; defaults to :func:`default_cache_dir`.  Created if
            missing.
        validate: Optional ``validate(dir)`` that raises if an entry is unusable.
            It runs on every hit (after the manifest check) and on the freshly
            built directory before it is published (a failure there is raised to
            the caller; nothing is cached).
        lock_timeout: Seconds to wait for another process's build; ``-1`` waits
            forever.  On expiry :class:`filelock.Timeout` (a ``TimeoutError``) is
            raised.
        check_hashes: Verify the sha256 of every file on a hit (default).  With
            ``False`` only presence and sizes are checked (faster for huge
            entries).

    Returns:
        :class:`CacheLookup` with the entry directory and ``hit=False`` iff this
        call ran ``build``.

    A corrupt entry (manifest missing, size/checksum mismatch, or ``validate``
    raising) is logged as a warning, removed and rebuilt; a corrupt entry is never
    returned.  If ``build`` raises (or the process dies) no entry is created, the
    exception propagates, and the temp dir is removed (now, or by the next lock
    holder after a crash).  The resumable work dir (:func:`resumable_dir`) of the
    key is deleted after a successful build.

    Example:
        >>> import tempfile
        >>> calls = []
        >>> def build(tmp):
        ...     calls.append(1)
        ...     (tmp / "A.bin").write_bytes(b"abc")
        >>> root = tempfile.mkdtemp()
        >>> get_or_build("model-r8", build, cache_dir=root).hit
        False
        >>> res = get_or_build("model-r8", build, cache_dir=root)
        >>> res.hit, (res.path / "A.bin").read_bytes(), len(calls)
        (True, b'abc', 1)
    """
    _validate_key(key)
    root = _root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / key

    # Fast path: no lock needed to *read* a valid, already-published entry.
    if os.path.lexists(final) and _check_entry(final, validate, check_hashes) is None:
        logger.debug("Cache hit for key %r at %s.", key, final)
        return CacheLookup(path=final, hit=True)

    logger.debug("Acquiring cache lock %s.", _lock_path(root, key))
    with exclusive_lock(_lock_path(root, key), timeout=lock_timeout):
        if os.path.lexists(final):
            err = _check_entry(final, validate, check_hashes)
            if err is None:
                logger.info("Cache entry for key %r at %s was built by another process; reusing it.", key, final)
                return CacheLookup(path=final, hit=True)
            logger.warning(
                "Cache entry for key %r at %s is invalid and will be rebuilt: %s: %s",
                key,
                final,
                type(err).__name__,
                err,
            )
            _discard(final, root, key)
        _clean_stale(root, key)

        tmp = root / f"{_TMP_PREFIX}{key}-{os.getpid()}-{uuid.uuid4().hex}"
        tmp.mkdir()
        started = time.monotonic()
        try:
            build(tmp)
            write_manifest(tmp, fsync=True)
            if validate is not None:
                validate(tmp)
            os.replace(tmp, final)
        except BaseException:
            _rmtree(tmp)
            raise
        _fsync_dir(root)
        logger.info("Built cache entry for key %r at %s in %.1fs.", key, final, time.monotonic() - started)
        partial = _partial_path(root, key)
        if partial.exists():
            _rmtree(partial)
    return CacheLookup(path=final, hit=False)


def remove(key: str, cache_dir: str | Path | None = None) -> bool:
    """Delete the entry for ``key`` (plus its resumable work dir and stale temp dirs).

    Waits for a build of the same key in progress.  Returns ``True`` if an entry
    or work dir existed and was removed.

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> _ = get_or_build("k", lambda d: (d / "f").write_text("x"), cache_dir=root)
        >>> remove("k", root), remove("k", root)
        (True, False)
    """
    _validate_key(key)
    root = _root(cache_dir)
    if not root.is_dir():
        return False
    removed = False
    with exclusive_lock(_lock_path(root, key)):
        final = root / key
        if os.path.lexists(final):
            _discard(final, root, key)
            removed = True
        partial = _partial_path(root, key)
        if partial.exists():
            _rmtree(partial)
            removed = True
        _clean_stale(root, key)
    if removed:
        logger.info("Removed cache entry for key %r from %s.", key, root)
    return removed
