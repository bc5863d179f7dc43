"""Where things live in a cache root: the root itself, key validation, and the on-disk names of an entry, its
lock file, its resumable work dir and the temporary / trash directories of interrupted builds.

Nothing here touches the filesystem; every function only computes paths.

Example:
    >>> entry_path("abc", "/tmp/cache").as_posix()
    '/tmp/cache/abc'
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = [
    "CACHE_ENV_VAR",
    "PARTIAL_PREFIX",
    "TMP_PREFIX",
    "TMP_RE",
    "TRASH_PREFIX",
    "TRASH_RE",
    "cache_root",
    "default_cache_dir",
    "entry_path",
    "lock_path",
    "partial_path",
    "validate_key",
]

#: Environment variable overriding the cache root (read at call time).
CACHE_ENV_VAR = "INILORA_HF_CACHE"
#: Prefix of the temporary directory a build writes into: ``.tmp-<key>-<pid>-<uuid>``.
TMP_PREFIX = ".tmp-"
#: Prefix of a directory renamed aside before deletion: ``.trash-<key>-<uuid>``.
TRASH_PREFIX = ".trash-"
#: Prefix of a key's resumable work dir: ``.partial-<key>``.
PARTIAL_PREFIX = ".partial-"
#: Pattern of temporary directory names; group ``key`` is the key they belong to.
TMP_RE = re.compile(r"^\.tmp-(?P<key>.+)-(?P<pid>\d+)-(?P<uid>[0-9a-f]{32})$")
#: Pattern of trash directory names; group ``key`` is the key they belong to.
TRASH_RE = re.compile(r"^\.trash-(?P<key>.+)-(?P<uid>[0-9a-f]{32})$")

_KEY_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_MAX_KEY_LEN = 200  # leaves room for the ".tmp-<key>-<pid>-<uuid>" name within 255 bytes


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
        os.path.expanduser(os.getenv("HF_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", default_home), "huggingface")))
    )
    return Path(hf_home) / "inilora"


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid cache key, else raise :class:`ValueError` saying why not.

    A key is non-empty, at most 200 characters of ``[A-Za-z0-9._-]``, contains no ``..``, does not start
    with ``.`` (reserved for internal files) and does not end with ``.lock`` (lock files).

    Example:
        >>> validate_key("Qwen2.5-0.5B_r16")
        'Qwen2.5-0.5B_r16'
    """
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


def cache_root(cache_dir: str | Path | None) -> Path:
    """Return the cache root: ``cache_dir`` (``~`` expanded), or :func:`default_cache_dir` when it is ``None``.

    Example:
        >>> cache_root("/tmp/cache").as_posix()
        '/tmp/cache'
    """
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def entry_path(key: str, cache_dir: str | Path | None = None) -> Path:
    """Return where the entry for ``key`` lives (``<cache_dir>/<key>``); it may not exist.

    Example:
        >>> entry_path("abc", "/tmp/cache").as_posix()
        '/tmp/cache/abc'
    """
    return cache_root(cache_dir) / validate_key(key)


def lock_path(root: Path, key: str) -> Path:
    """Return the lock file that serialises builders of ``key``: ``<root>/<key>.lock``.

    Example:
        >>> lock_path(Path("/tmp/cache"), "abc").as_posix()
        '/tmp/cache/abc.lock'
    """
    return root / f"{key}.lock"


def partial_path(root: Path, key: str) -> Path:
    """Return the resumable work dir of ``key``: ``<root>/.partial-<key>``.

    Example:
        >>> partial_path(Path("/tmp/cache"), "abc").as_posix()
        '/tmp/cache/.partial-abc'
    """
    return root / f"{PARTIAL_PREFIX}{key}"
