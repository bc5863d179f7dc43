"""Compare init variants on one model and dataset: `compare`, its statistics, report and run records."""

from .api import compare

__all__ = ["compare"]
