"""``python -m nestedtrain.cli``, the same as ``python -m nestedtrain``."""

from . import entry

if __name__ == "__main__":
    entry()
