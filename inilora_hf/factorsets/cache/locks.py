"""Inter-process locks whose lock files do not pile up (`exclusive_lock`, with an example)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from filelock import FileLock

__all__ = ["exclusive_lock"]


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
