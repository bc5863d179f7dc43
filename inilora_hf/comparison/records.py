"""The files of a comparison folder: `config.json`, one `runs/<variant>__seed<seed>.json` per finished run, and
the final `results.json`. Each is written to a temporary file and renamed into place, so a folder holds finished
runs only: an interrupted run leaves nothing that a re-run would read.

Several processes may work on one folder at once (the same `compare` started in several shells, or on several
machines sharing the folder): a run is claimed through an inter-process lock (`.lock-<variant>__seed<seed>`) before it
starts, so each run is done once, and a run's work folder (`.tmp-run-<variant>__seed<seed>-*`) is removed as a
leftover only when no process holds that run's lock.

Example:
    >>> store = RunStore("cmp")                                                        # doctest: +SKIP
    >>> store.start({"model": "m", "learning_rate": 1e-3})                             # doctest: +SKIP
    >>> store.finished("lora", 0)                                                      # doctest: +SKIP
    False
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any

from filelock import Timeout

from inilora_hf.errors import CompareInputError, OutputExistsError
from inilora_hf.factorsets.cache.locks import exclusive_lock

CONFIG_FILE = "config.json"
RUNS_DIR = "runs"
# Config entries that may change between a run and its resumption: which variants and seeds to run.
RESUMABLE_KEYS = frozenset({"variants", "seeds"})
WORK_PREFIX, LOCK_PREFIX = ".tmp-run-", ".lock-"
_STARTING = (LOCK_PREFIX, f".{CONFIG_FILE}.")  # what another process starting on the same folder may have written


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename, so readers (and
    other processes writing the same file) see the old content or the new one, never a mix.

    Example:
        >>> write_atomic(Path("out/summary.md"), b"# Comparison")                          # doctest: +SKIP
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, 0o644)  # mkstemp creates it private; results are ordinary files
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, value: Any) -> None:
    """Write `value` as JSON to `path` atomically (`write_atomic`).

    Example:
        >>> write_json_atomic(Path("out/results.json"), {"runs": []})                    # doctest: +SKIP
    """
    write_atomic(path, json.dumps(value, indent=1).encode())


class RunStore:
    """The finished runs of one comparison folder (`root`)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def run_path(self, variant: str, seed: int) -> Path:
        """Where the record of `variant` × `seed` is kept."""
        return self.root / RUNS_DIR / f"{variant}__seed{seed}.json"

    def claim(self, variant: str, seed: int, *, wait: bool) -> AbstractContextManager[Any] | None:
        """Take the lock of `variant` × `seed` for the process that runs it: a context manager that holds it, or
        None when another process holds it and `wait` is False (`wait=True` blocks until it is released).

        Example:
            >>> held = store.claim("lora", 0, wait=False)                                   # doctest: +SKIP
            >>> with held: ...                                                               # doctest: +SKIP
        """
        stack = ExitStack()
        try:
            stack.enter_context(
                exclusive_lock(self.root / f"{LOCK_PREFIX}{variant}__seed{seed}", timeout=-1 if wait else 0)
            )
        except Timeout:
            return None
        return stack

    def work_dir(self, variant: str, seed: int) -> Path:
        """A new work folder for a run (hold its `claim`): removed when the run ends, or later as a leftover."""
        return Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{variant}__seed{seed}-", dir=self.root))

    def check(self, *, overwrite: bool = False) -> None:
        """Refuse, before any work, a `root` that is a file or a non-empty folder holding no comparison (unless
        `overwrite=True`).

        Raises:
            OutputExistsError: `root` is a file, or holds files that are not a comparison.
        """
        if self.root.exists() and not self.root.is_dir():
            raise OutputExistsError(f"{self.root} exists and is not a folder; give the path of a new folder.")
        if (
            not overwrite
            and self.root.is_dir()
            and not (self.root / CONFIG_FILE).is_file()
            and any(not path.name.startswith(_STARTING) for path in self.root.iterdir())
        ):
            raise OutputExistsError(
                f"{self.root} is not empty and holds no comparison; choose another --output-dir, or pass --overwrite "
                "(overwrite=True) to delete its content."
            )

    def start(self, config: dict[str, Any], *, overwrite: bool = False) -> None:
        """Prepare `root` for `config`: a new or empty folder is set up; a folder of the same comparison (same
        config but for `variants` and `seeds`) is resumed; anything else is refused, unless `overwrite=True`, which
        deletes the folder's content first.

        Raises:
            OutputExistsError: `root` is a file, or holds files that are not a comparison.
            CompareInputError: `root` holds runs of a comparison with a different configuration.
        """
        self.check(overwrite=overwrite)
        if overwrite and self.root.is_dir():
            shutil.rmtree(self.root)
        stored_path = self.root / CONFIG_FILE
        if stored_path.is_file():
            stored = json.loads(stored_path.read_text())
            changed = sorted(
                key
                for key in set(stored) | set(config)
                if key not in RESUMABLE_KEYS and stored.get(key) != config.get(key)
            )
            if changed:
                raise CompareInputError(
                    f"{self.root} holds runs of a comparison with other settings ({', '.join(changed)} differ); "
                    "choose another --output-dir, or pass --overwrite (overwrite=True) to delete them and start over."
                )
        write_json_atomic(stored_path, config)
        for leftover in self.root.glob(f"{WORK_PREFIX}*"):  # the work folder of an interrupted run, or a running one
            variant, _, seed = leftover.name.removeprefix(WORK_PREFIX).rsplit("-", 1)[0].rpartition("__seed")
            held = self.claim(variant, int(seed), wait=False) if seed.isdigit() else ExitStack()
            if held is not None:  # no process is running it
                with held:
                    shutil.rmtree(leftover, ignore_errors=True)

    def finished(self, variant: str, seed: int) -> bool:
        """Whether `variant` × `seed` has a record."""
        return self.run_path(variant, seed).is_file()

    def save(self, record: dict[str, Any]) -> None:
        """Record a finished run (atomically)."""
        write_json_atomic(self.run_path(record["variant"], record["seed"]), record)

    def load(self, variant: str, seed: int) -> dict[str, Any]:
        """The record of a finished run."""
        return json.loads(self.run_path(variant, seed).read_text())
