"""Stop signals (SIGTERM, SIGUSR1, Ctrl-C): what a process does with them, from its first line.

A scheduler sends SIGTERM or SIGUSR1 at any moment: while torch loads, while the data is read,
in a step, in an evaluation, after the run is done. :class:`StopSignals` turns them into
something the program decides on instead of the default action (death, status 143):

- *deferred* (``defer=True``), the signal is recorded in ``requested``; the training loop reads
  it between steps, writes a checkpoint and stops. A second Ctrl-C raises KeyboardInterrupt.
- *at once* (``defer=False``), SIGTERM and SIGUSR1 raise :class:`StopRequested` where the
  program is, for a command that has nothing to save yet (Ctrl-C raises KeyboardInterrupt,
  as Python does by default).

The command line installs one at process start, before the heavy imports, and keeps it through
teardown; a ``StopSignals`` entered while another is installed shares it (see ``__enter__``).

This module imports nothing but the standard library (and :mod:`nestedtrain.errors`, which
imports nothing else), so that it can come first.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

from .errors import EXIT_INTERRUPTED

__all__ = ["STOP_SIGNALS", "StopRequested", "StopSignals"]

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


class StopRequested(BaseException):
    """SIGTERM or SIGUSR1 arrived where nothing was to be saved; raised where the program was.

    A ``BaseException``, as KeyboardInterrupt is, so that ``except Exception`` blocks let it
    through.
    """

    exit_status = EXIT_INTERRUPTED

    def __init__(self, signal_name: str):
        self.signal_name = signal_name
        super().__init__(f"{signal_name}: stopped")


class StopSignals:
    """Handles SIGTERM/SIGUSR1/SIGINT while installed instead of dying on them.

    Use as a context manager around the code the signals may interrupt (the previous handlers
    come back on exit), or :meth:`install` for the rest of the process. ``requested`` is the
    first signal's name while deferred, or None. Handlers are only installed from the main
    thread (Python's rule). A process forked from the installer (a DataLoader worker) ignores
    the signals: its parent stops it.

    Args:
        defer: record the signal for the caller to act on (True), or raise
            :class:`StopRequested` at once (False). Settable: a command switches to deferred
            once it can stop cleanly on its own, and when it is done.
    """

    def __init__(self, defer: bool = True) -> None:
        self.defer = defer
        self._requested: str | None = None
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()
        self._outer: StopSignals | None = None  # the installed one this shares, if any
        self._outer_defer = True

    @property
    def requested(self) -> str | None:
        """The first stop signal received while deferred, or None."""
        return self._outer.requested if self._outer is not None else self._requested

    @staticmethod
    def installed() -> StopSignals | None:
        """The ``StopSignals`` handling SIGTERM in this process, or None."""
        owner = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
        if isinstance(owner, StopSignals) and owner._pid == os.getpid():
            return owner
        return None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            return  # a forked worker: the parent decides, and ends it
        name = signal.Signals(signum).name
        if not self.defer:
            if name == "SIGINT":
                raise KeyboardInterrupt
            raise StopRequested(name)
        if self._requested == "SIGINT" and name == "SIGINT":
            raise KeyboardInterrupt
        if self._requested is None:
            self._requested = name

    def install(self) -> StopSignals:
        """Handle the stop signals from now on (until :meth:`uninstall`)."""
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                if hasattr(signal, name):
                    number = getattr(signal, name)
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def finish(self) -> None:
        """The process is done: from now on SIGTERM and SIGUSR1 change nothing.

        They are ignored outright rather than handled in Python: the interpreter puts the
        default action back for Python handlers as it shuts down, and torch's teardown takes a
        moment. (Ctrl-C is still handled: a second one interrupts a teardown that hangs.)
        """
        self.defer = True
        if threading.current_thread() is threading.main_thread():
            for name in ("SIGTERM", "SIGUSR1"):
                if hasattr(signal, name):
                    signal.signal(getattr(signal, name), signal.SIG_IGN)

    def uninstall(self) -> None:
        """Put the handlers found by :meth:`install` back."""
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def __enter__(self) -> StopSignals:
        outer = StopSignals.installed()
        if outer is None:
            return self.install()
        # Another one (the command line's) is installed: share it, deferred for the block, so
        # that a signal received before the block is not lost and one after it is not missed.
        self._outer, self._outer_defer = outer, outer.defer
        outer.defer = True
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if self._outer is None:
            self.uninstall()
            return
        outer, self._outer = self._outer, None
        outer.defer = self._outer_defer
        if not outer.defer and outer._requested is not None and exc_type is None:
            # Back to "at once" with a signal the block did not act on: act on it now.
            name, outer._requested = outer._requested, None
            if name == "SIGINT":
                raise KeyboardInterrupt
            raise StopRequested(name)
