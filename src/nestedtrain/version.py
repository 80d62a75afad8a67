"""The package's version (a leaf: the engine records it in run folders and checkpoints)."""

__version__ = "0.1.0"
