"""``python -m nestedtrain ...``: the ``nestedtrain`` command."""

from .cli import entry

if __name__ == "__main__":
    entry()
