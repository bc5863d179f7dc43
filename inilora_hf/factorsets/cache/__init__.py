"""Robust, process-safe local cache of *directory* entries.

Factor sets are expensive to compute (minutes to hours), so :func:`get_or_build`
stores each one as a directory ``<cache_dir>/<key>/`` and lets every later call
(Trainer re-inits, hyper-parameter-search trials, every rank of a multi-process
run) reuse it.  This package deals with one concern only: keys, atomic writes,
inter-process locks and corruption handling.  It knows nothing about what the
files contain; the caller provides ``build(dir)`` (writes the files) and,
optionally, ``validate(dir)`` (raises on a bad entry).

Modules: :mod:`.layout` (the root, keys and on-disk names), :mod:`.fs` (fsync,
hide-then-delete), :mod:`.locks` (:func:`exclusive_lock`), :mod:`.manifest`
(:func:`write_manifest`, :func:`verify_manifest`), :mod:`.partial` (resumable
work dirs, leftovers of interrupted builds) and :mod:`.entries`
(:func:`get_or_build`, :func:`remove`); this ``__init__`` re-exports their
public names.

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
    >>> from inilora_hf.factorsets.cache import get_or_build
    >>> def build(tmp: Path) -> None:
    ...     (tmp / "weights.bin").write_bytes(b"\\x00" * 16)
    >>> root = tempfile.mkdtemp()
    >>> first = get_or_build("demo-key", build, cache_dir=root)
    >>> second = get_or_build("demo-key", build, cache_dir=root)
    >>> (first.hit, second.hit, first.path == second.path)
    (False, True, True)
"""

from .entries import CacheLookup, get_or_build, remove
from .layout import CACHE_ENV_VAR, default_cache_dir, entry_path
from .locks import exclusive_lock
from .manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    CacheEntryCorruptError,
    verify_manifest,
    write_manifest,
)
from .partial import resumable_dir

__all__ = [
    "CACHE_ENV_VAR",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
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
