"""The exception that means "a user's input is wrong", as opposed to a bug."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A user's input is wrong: a recipe field, an override, an option, a path or a file.

    The message says what was wrong, with the offending value, and what would be right; the
    command line prints it as one line and exits with status 2. Any other exception is a bug
    and keeps its traceback. It is a ``ValueError`` so that callers catching ``ValueError``
    keep working.
    """
