"""What interrupted builds leave behind: a key's resumable work dir (kept on purpose, so that the next build
resumes), and its temporary / trash directories (removed by the next holder of the key's lock).

Example:
    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> resumable_dir("k", cache_dir=root).name
    '.partial-k'
"""

from __future__ import annotations

import os
from pathlib import Path

from inilora_hf.log import get_logger

from .fs import rmtree
from .layout import TMP_RE, TRASH_RE, cache_root, partial_path, validate_key

logger = get_logger(__name__)

__all__ = ["clean_stale", "resumable_dir"]


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
        >>> import os, tempfile
        >>> from inilora_hf.factorsets.cache import get_or_build
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
    path = partial_path(cache_root(cache_dir), validate_key(key))
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def clean_stale(root: Path, key: str) -> None:
    """Remove leftover temp/trash dirs of ``key`` (not those of other keys). Call only while holding the key's lock.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / f".tmp-k-123-{'0' * 32}").mkdir()
        >>> clean_stale(root, "k")
        >>> sorted(p.name for p in root.iterdir())
        []
    """
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        m = TMP_RE.match(name) or TRASH_RE.match(name)
        if m is not None and m.group("key") == key:
            logger.info("Removing stale cache temp directory %s (interrupted build of key %r).", root / name, key)
            rmtree(root / name)
