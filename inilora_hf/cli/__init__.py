"""The console script `inilora-hf` (layer 6): subcommands in `app`, the end-to-end demo in `demo`."""

from .app import main

__all__ = ["main"]
