"""Output folders: refused before any work when they already hold something, replaced without mixing old and new.

Light on purpose (no torch): the command line checks every output folder before it imports anything heavy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputExistsError
from .log import get_logger

logger = get_logger(__name__)


def check_output_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Raise `OutputExistsError` unless `path` may be written: it is missing, an empty folder, or a non-empty folder
    with `overwrite=True`. Call it for every output of a job before the job starts.

    Example:
        >>> check_output_dir("a-folder-that-does-not-exist")
        PosixPath('a-folder-that-does-not-exist')
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"{target} exists and is not a folder; give the path of a new folder.")
    if target.is_dir() and not overwrite and any(target.iterdir()):
        raise OutputExistsError(
            f"{target} already exists and is not empty; replace it with --overwrite (overwrite=True in Python), "
            "or choose another folder."
        )
    return target


@contextlib.contextmanager
def replacing_output_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Write a folder in place, replacing an existing one only once the new one is complete.

    The folder is checked first (`check_output_dir`). An existing folder is renamed to a hidden sibling, and the
    new content is written at `path` itself (so paths recorded inside it, e.g. a base model the job saved there,
    stay valid). On success the old folder is deleted; on any error or interrupt the partial new folder is removed
    and the old one renamed back. `path` thus holds the old folder or the complete new one, never a mix (a process
    killed outright, e.g. by SIGKILL, leaves its partial folder at `path` and the old one in `.<name>.old-*`).

    Example:
        >>> with replacing_output_dir("demo-out", overwrite=True) as folder:     # doctest: +SKIP
        ...     (folder / "result.txt").write_text("done")
    """
    target = check_output_dir(path, overwrite=overwrite)
    previous = None
    if target.exists():
        previous = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
        os.replace(target, previous)
    try:
        target.mkdir(parents=True)
        yield target
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        if previous is not None:
            os.replace(previous, target)
            logger.info("Kept the previous content of %s: the job did not finish.", target)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


@contextlib.contextmanager
def staged_output_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a new hidden sibling folder of `path` to write into; on success it replaces `path` atomically.

    The folder is checked first (`check_output_dir`). On any error or interrupt the staged folder is removed and
    `path` is left as it was; if the process stops between the two renames of a replacement, the old folder is
    renamed back. `path` thus holds the old folder or the complete new one, never a part.

    Example:
        >>> with staged_output_dir("export-out", overwrite=True) as folder:     # doctest: +SKIP
        ...     (folder / "config.json").write_text("{}")
    """
    target = check_output_dir(path, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    previous = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
    staged.mkdir()
    try:
        yield staged
        if target.exists():
            os.replace(target, previous)
        os.replace(staged, target)
    finally:
        if previous.exists() and not target.exists():  # stopped between the two renames: keep the old folder
            os.replace(previous, target)
        shutil.rmtree(staged, ignore_errors=True)
        shutil.rmtree(previous, ignore_errors=True)
