"""Library logging in the `transformers.logging` style: one `inilora_hf` root logger, WARNING by default.

Set the level with `INILORA_HF_VERBOSITY=info|debug|warning|error` or `inilora_hf.log.set_verbosity(logging.INFO)`;
progress bars follow `transformers.utils.logging.disable_progress_bar()`.
"""

from __future__ import annotations

import logging
import os
import sys

_ROOT = "inilora_hf"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _configure_root() -> logging.Logger:
    root = logging.getLogger(_ROOT)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(levelname)s|%(name)s] %(message)s"))
        root.addHandler(handler)
        root.setLevel(_LEVELS.get(os.environ.get("INILORA_HF_VERBOSITY", "").lower(), logging.WARNING))
        root.propagate = True
    return root


def get_logger(name: str) -> logging.Logger:
    """A logger under the `inilora_hf` root (call with `__name__`).

    Example:
        >>> get_logger("inilora_hf.factorsets.cache").name
        'inilora_hf.factorsets.cache'
    """
    _configure_root()
    return logging.getLogger(name)


def set_verbosity(level: int) -> None:
    """Set the level of every inilora_hf logger, e.g. `set_verbosity(logging.INFO)`."""
    _configure_root().setLevel(level)
