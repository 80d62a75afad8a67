"""A run's folder: what may start or resume in it, its config.yaml, lock and checkpoints.

:class:`RunLock` keeps two processes from writing one run folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import timm
import torch
from omegaconf import DictConfig

from ..atomic import atomic_save, atomic_write_text, previous_path
from ..errors import ConfigError
from ..records import CONFIG_FILE, SUMMARY_FILE, truncate_logs
from ..version import __version__
from .checkpoint import save_checkpoint
from .config import to_yaml
from .resume import RecipeChanges

__all__ = ["RunFolder", "RunLock"]

logger = logging.getLogger("nestedtrain")


class RunFolder:
    """``out_dir`` and the files a run keeps there (``checkpoints/last.pt``, ``best.pt``,
    ``config.yaml``, the models of a finished run)."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir)
        self.last = self.path / "checkpoints" / "last.pt"

    def check_start(self, resume: bool) -> None:
        """A resume needs a checkpoint; a fresh start needs a folder without a run.

        Raises:
            ConfigError: either is not so.
        """
        if resume and not (self.last.is_file() or previous_path(self.last).is_file()):
            raise ConfigError(
                f"--resume: {str(self.path)!r} has no checkpoints/last.pt to resume from"
            )
        if not resume and self.holds_a_run():
            raise ConfigError(
                f"run folder {str(self.path)!r} already holds a run: pass --resume to continue "
                "it, or choose another --out"
            )

    def holds_a_run(self) -> bool:
        """Whether the folder holds a run to resume or a finished one; a start stopped before
        its first checkpoint leaves only config.yaml (and perhaps logs) and counts as none."""
        files = (self.last, previous_path(self.last), self.path / SUMMARY_FILE)
        return any(p.exists() for p in files)

    def prepare(self, cfg: DictConfig, changes: RecipeChanges | None, facts: dict) -> None:
        """Make the folder; a fresh start writes ``config.yaml`` (with ``facts`` about the
        run in comments, so that it stays a recipe to rerun), a resume records ``changes``."""
        (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        if changes is not None:
            if changes:
                logger.warning(changes.describe())
                changes.record(self.path, cfg)
            return
        # A start stopped before its first checkpoint may have left logs: start them afresh.
        truncate_logs(self.path, before_epoch=0)
        meta = {"nestedtrain": __version__, "torch": str(torch.__version__)}
        meta.update(timm=timm.__version__, git_commit=_git_commit(), **facts)
        header = "".join(f"# {key}: {value}\n" for key, value in meta.items())
        atomic_write_text(self.path / CONFIG_FILE, header + to_yaml(cfg))

    def save(self, state: dict[str, Any], best: bool = False) -> None:
        """``last.pt`` (keeping the one it replaces as ``last.prev.pt``), and ``best.pt``."""
        save_checkpoint(state, self.last)
        if best:
            atomic_save(state, self.last.with_name("best.pt"))

    def save_models(self, models: dict[str, torch.nn.Module]) -> None:
        """A finished run's weights: ``weights.pt`` for ``"weights"``, else ``<name>.pt``."""
        for name, model in models.items():
            atomic_save(model.state_dict(), self.path / f"{name}.pt")

    @contextlib.contextmanager
    def locked(self, on: bool = True) -> Iterator[None]:
        """Hold the folder's lock (rank 0: ``on``); a stale one is taken over, with a warning.

        Raises:
            ConfigError: another live process holds it.
        """
        lock = RunLock(self.path) if on else None
        if lock is not None:
            lock.acquire()
            if lock.took_over is not None:
                owner = lock.took_over
                logger.warning(
                    f"took over the stale lock of pid {owner.get('pid')} on {owner.get('host')}"
                )
        try:
            yield
        finally:
            if lock is not None:
                lock.release()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


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
