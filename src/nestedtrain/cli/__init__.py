"""The ``nestedtrain`` command line: one module per group of commands.

- :mod:`.train`: ``train``, ``eval``, ``flops``, ``demo``;
- :mod:`.deploy`: ``export``, ``select``;
- :mod:`.latency`: ``latency-kit``;
- :mod:`.analyze`: ``analyze ...``, ``report``;
- :mod:`.motivation`: ``efficiency``, ``tune-k``;
- :mod:`.sweep`: ``sweep``, ``compare``;
- :mod:`.check_data`: ``check-data``;
- :mod:`.common`: what they share (parser, one-line errors, table, recorded command line).

Library code raises; this package alone prints and sets exit statuses. Bad input is one line
on stderr and exit status 2. This module imports the commands (and with them torch) only once
:func:`entry` handles stop signals.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ..signals import StopRequested, StopSignals

__all__ = ["build_parser", "entry", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; each sets ``handler(args) -> exit status``."""
    from . import analyze, check_data, deploy, latency, motivation, sweep, train
    from .common import Parser

    parser = Parser(
        prog="nestedtrain",
        description="Train residual networks through their nested sub-networks.",
    )
    # what read the arguments travels with them: the recorded command line is rebuilt from it
    parser.set_defaults(root_parser=parser)
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    train.register(subparsers)  # train, eval, flops, demo
    deploy.register(subparsers)  # export, select
    latency.register(subparsers)  # latency-kit
    analyze.register(subparsers)  # analyze ..., report
    motivation.register(subparsers)  # efficiency, tune-k
    sweep.register(subparsers)  # sweep, compare
    check_data.register(subparsers)  # check-data
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each message, not as it was when the handler was
    made (``main`` may run more than once in a process, each time with its own stderr)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _log_to_stderr() -> None:
    # The library reports what a user should know (a checkpoint fallback, a stale lock) through
    # the "nestedtrain" logger: one line each on stderr.
    library_logger = logging.getLogger("nestedtrain")
    if not library_logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("nestedtrain: %(message)s"))
        library_logger.addHandler(handler)
        library_logger.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for bad input)."""
    from .common import run

    _log_to_stderr()
    return run(build_parser, argv)


def entry() -> None:
    """The ``nestedtrain`` console script and ``python -m nestedtrain``.

    Stop signals are handled from here on, before torch loads, and to the process's end: one
    that arrives before a command can stop cleanly ends it with status 75 (run it again), one
    that arrives after it is done changes nothing (``nestedtrain train`` defers them while it
    trains: see ``cmd_train``).
    """
    signals = StopSignals(defer=False).install()
    try:
        status = main()
    except StopRequested as stop:
        signals.defer = True
        print(
            f"nestedtrain: {stop.signal_name} before the command could stop cleanly; what it "
            "wrote is whole: run the same command again",
            file=sys.stderr,
        )
        status = stop.exit_status
    except KeyboardInterrupt:  # Ctrl-C before ``run`` catches it: while the commands load
        signals.defer = True
        print("nestedtrain: interrupted", file=sys.stderr)
        status = 130
    finally:
        signals.finish()  # done: a signal from here on changes nothing
    sys.exit(status)
