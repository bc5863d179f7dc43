"""Cache entries: :func:`get_or_build` (exactly one builder per key, atomic publication, no corrupt hits) and
:func:`remove`.

Example:
    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> get_or_build("k", lambda d: (d / "f").write_text("x"), cache_dir=root).hit
    False
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from inilora_hf.log import get_logger

from .fs import discard, fsync_dir, rmtree
from .layout import TMP_PREFIX, cache_root, lock_path, partial_path, validate_key
from .locks import exclusive_lock
from .manifest import verify_manifest, write_manifest
from .partial import clean_stale

logger = get_logger(__name__)

__all__ = ["CacheLookup", "get_or_build", "remove"]


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


def _check_entry(path: Path, validate: Callable[[Path], None] | None, check_hashes: bool) -> Exception | None:
    """Return ``None`` if ``path`` is a valid entry, else the exception explaining why not."""
    try:
        verify_manifest(path, check_hashes=check_hashes)
        if validate is not None:
            validate(path)
    except Exception as err:
        return err
    return None


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
    validate_key(key)
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / key

    # Fast path: no lock needed to *read* a valid, already-published entry.
    if os.path.lexists(final) and _check_entry(final, validate, check_hashes) is None:
        logger.debug("Cache hit for key %r at %s.", key, final)
        return CacheLookup(path=final, hit=True)

    logger.debug("Acquiring cache lock %s.", lock_path(root, key))
    with exclusive_lock(lock_path(root, key), timeout=lock_timeout):
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
            discard(final, root, key)
        clean_stale(root, key)

        tmp = root / f"{TMP_PREFIX}{key}-{os.getpid()}-{uuid.uuid4().hex}"
        tmp.mkdir()
        started = time.monotonic()
        try:
            build(tmp)
            write_manifest(tmp, fsync=True)
            if validate is not None:
                validate(tmp)
            os.replace(tmp, final)
        except BaseException:
            rmtree(tmp)
            raise
        fsync_dir(root)
        logger.info("Built cache entry for key %r at %s in %.1fs.", key, final, time.monotonic() - started)
        partial = partial_path(root, key)
        if partial.exists():
            rmtree(partial)
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
    validate_key(key)
    root = cache_root(cache_dir)
    if not root.is_dir():
        return False
    removed = False
    with exclusive_lock(lock_path(root, key)):
        final = root / key
        if os.path.lexists(final):
            discard(final, root, key)
            removed = True
        partial = partial_path(root, key)
        if partial.exists():
            rmtree(partial)
            removed = True
        clean_stale(root, key)
    if removed:
        logger.info("Removed cache entry for key %r from %s.", key, root)
    return removed
