"""The package version (layer 0: imported by the provenance records of every layer)."""

__version__ = "0.1.0"
