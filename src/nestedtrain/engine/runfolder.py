"""A run's folder: what may start or resume in it, its config.yaml, lock and checkpoints."""

from __future__ import annotations

import contextlib
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import timm
import torch
from omegaconf import DictConfig

from ..errors import ConfigError
from ..runfiles import (
    CONFIG_FILE,
    SUMMARY_FILE,
    atomic_save,
    atomic_write_text,
    previous_path,
    truncate_logs,
)
from ..version import __version__
from .checkpoint import save_checkpoint
from .config import to_yaml
from .faults import RunLock
from .resume import RecipeChanges

__all__ = ["RunFolder"]

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
