"""What a long training job meets: signals from the scheduler, a second process, divergence.

- :class:`StopSignals` (from ``nestedtrain.signals``) turns SIGTERM, SIGUSR1 and SIGINT
  (Ctrl-C) into a request that the loop reads between steps: it finishes the step, writes a
  checkpoint and raises :class:`TrainingInterrupted`. A second Ctrl-C stops at once.
- :class:`RunLock` keeps two processes from writing one run folder.
- :class:`TrainingDiverged` is raised when a loss term stops being finite.

The exceptions carry the CLI's exit status (:data:`EXIT_INTERRUPTED`, :data:`EXIT_DIVERGED`), so
that a job script can tell "requeue me" from "look at me".
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..signals import EXIT_INTERRUPTED, StopSignals

__all__ = [
    "EXIT_DIVERGED",
    "EXIT_INTERRUPTED",
    "RunLock",
    "StopSignals",
    "TrainingDiverged",
    "TrainingInterrupted",
]

# The run cannot go on: lower the learning rate, or resume from an earlier checkpoint.
EXIT_DIVERGED = 3


class TrainingInterrupted(Exception):
    """A stop signal arrived; the run stopped after a step and its checkpoint is written."""

    exit_status = EXIT_INTERRUPTED

    def __init__(self, signal_name: str, epoch: int, step: int, checkpoint: Path):
        self.signal_name, self.epoch, self.step, self.checkpoint = (
            signal_name,
            epoch,
            step,
            checkpoint,
        )
        super().__init__(
            f"{signal_name}: stopped after step {step} of epoch {epoch + 1}; checkpoint "
            f"{checkpoint} written, continue with --resume"
        )


class TrainingDiverged(Exception):
    """A loss term became NaN or infinite; nothing after the last finite checkpoint is saved."""

    exit_status = EXIT_DIVERGED

    def __init__(self, epoch: int, step: int, term: str, value: float, checkpoint: Path | None):
        self.epoch, self.step, self.term, self.value = epoch, step, term, value
        kept = (
            f"{checkpoint} holds the last finite state"
            if checkpoint is not None
            else "no checkpoint was written yet"
        )
        super().__init__(
            f"training diverged: loss term {term!r} is {value} at step {step} of epoch "
            f"{epoch + 1}; {kept} (lower optim.lr, or set optim.clip_grad)"
        )


class RunLock:
    """``RUN/.lock`` names the process writing a run folder; a second one fails with one line.

    The owner refreshes the file's time every ``heartbeat`` seconds from a daemon thread. A
    lock is stale, and taken over, when its process is gone (same host), or when it has not
    been refreshed for ``stale_after`` seconds (another host: a preempted node leaves its lock
    behind).

    Raises:
        ConfigError: (on ``acquire``) another live process holds the folder.
    """

    def __init__(self, folder: str | Path, heartbeat: float = 30.0, stale_after: float = 180.0):
        self.path = Path(folder) / ".lock"
        self.heartbeat, self.stale_after = heartbeat, stale_after
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: dict[str, Any] | None = None

    def _owner(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _stale(self, owner: dict[str, Any] | None) -> bool:
        if owner is None:  # unreadable: a writer died between create and write
            return True
        if owner.get("host") == socket.gethostname():
            try:
                os.kill(int(owner["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError, KeyError):
                return False
            return False
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return True
        return age > self.stale_after

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if not self._stale(owner):
                    raise ConfigError(
                        f"run folder {str(self.path.parent)!r} is being written by pid "
                        f"{owner['pid']} on {owner['host']}: wait for it, or use another --out "
                        f"(delete {self.path} if that process is gone)"
                    ) from None
                self.took_over = owner
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            break
        else:
            raise ConfigError(f"could not take the lock {self.path}: another process keeps it")
        self._thread = threading.Thread(target=self._beat, name="nestedtrain-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            owner = self._owner()
            if owner is not None and owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
