"""Filesystem primitives of the cache: best-effort fsync of files and directories, and deletion that readers
never observe half-done (rename aside, then delete).

Example:
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> (root / "k").mkdir()
    >>> discard(root / "k", root, "k")
    >>> sorted(p.name for p in root.iterdir())
    []
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from inilora_hf.log import get_logger

from .layout import TRASH_PREFIX

logger = get_logger(__name__)

__all__ = ["discard", "fsync_dir", "fsync_fd", "rmtree"]


def fsync_fd(fd: int) -> None:
    """fsync an open file descriptor, ignoring :class:`OSError` (best effort).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryFile() as fh:
        ...     fsync_fd(fh.fileno())
    """
    with contextlib.suppress(OSError):  # e.g. read-only handles on Windows; best effort
        os.fsync(fd)


def fsync_dir(path: Path) -> None:
    """fsync a directory so that renames/creations in it are durable (POSIX only; best effort).

    Example:
        >>> import tempfile
        >>> fsync_dir(Path(tempfile.mkdtemp()))
    """
    if os.name == "nt":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fsync_fd(fd)
    finally:
        os.close(fd)


def rmtree(path: Path) -> None:
    """Delete a file or directory tree; a missing path is fine, other failures are logged, never raised.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "f").write_text("x")
        >>> rmtree(d)
        >>> d.exists()
        False
    """

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


def discard(path: Path, root: Path, key: str) -> None:
    """Atomically hide ``path`` (rename it to ``<root>/.trash-<key>-<uuid>``), then delete it.

    Renaming first means readers never observe a half-deleted entry.  Where the rename fails (e.g. Windows
    with open handles) the path is deleted in place.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> discard(root / "never-existed", root, "never-existed")
    """
    trash = root / f"{TRASH_PREFIX}{key}-{uuid.uuid4().hex}"
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return
    except OSError as err:  # e.g. Windows with open handles: fall back to in-place deletion
        logger.debug("Could not rename %s aside (%s); deleting in place.", path, err)
        rmtree(path)
        return
    rmtree(trash)
