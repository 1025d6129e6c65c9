"""Library version, written into every bundle's metadata."""

__version__ = "0.1.0"
