"""Checkpoints: written atomically, read back with a clear error for anything foreign."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..errors import ConfigError

__all__ = [
    "CHECKPOINT_FORMAT",
    "atomic_save",
    "atomic_append_line",
    "atomic_write_text",
    "load_checkpoint",
    "load_model",
    "load_resume_checkpoint",
    "previous_path",
    "resolve_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "nestedtrain-checkpoint-v1"


def atomic_save(
    obj: Any, path: str | Path, saver: Callable[[Any, BinaryIO], None] = torch.save
) -> None:
    """Save to a temporary file in the same folder, then rename it over ``path``.

    A crash before the rename leaves the previous file intact; the rename itself is atomic.

    Args:
        obj: what to save.
        path: the destination.
        saver: ``torch.save`` by default; ``torch.jit.save`` for TorchScript.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            saver(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _temporary(path: Path) -> tuple[int, str]:
    """A temporary file beside ``path`` with the permissions a plain ``open`` would give it
    (``mkstemp`` makes files only their owner can read: a run folder or an exported model is
    often read by other accounts)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)
    return fd, tmp


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder's entry is on disk too (POSIX).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def previous_path(path: str | Path) -> Path:
    """Where :func:`save_checkpoint` keeps the checkpoint it replaced: ``last.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically, keeping the file it replaces as ``*.prev.pt``.

    The new file is complete and synced before the old one is moved aside, so at every moment
    at least one whole checkpoint is on disk: ``path``, or (for the instant between the two
    renames, or if ``path`` is later found damaged) the previous one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (temporary file, then rename)."""
    atomic_save(text.encode(), path, saver=lambda data, f: f.write(data))


def atomic_append_line(path: str | Path, line: str) -> None:
    """Add a line to a text file by rewriting it atomically, so a kill leaves the file with
    or without the line, never half of it (for logs of a line per epoch: small files)."""
    path = Path(path)
    before = path.read_text() if path.exists() else ""
    atomic_write_text(path, before + line.rstrip("\n") + "\n")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder (its ``checkpoints/last.pt``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise ConfigError(
            f"checkpoint {str(path)!r} does not exist: give a run folder or a .pt file from "
            "`nestedtrain train`"
        )
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a nestedtrain checkpoint.

    Raises:
        ConfigError: missing, unreadable, or not written by nestedtrain.
    """
    path = resolve_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:
        raise ConfigError(
            f"cannot read checkpoint {str(path)!r} ({type(err).__name__}): it is not a file "
            "written by torch.save"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"{str(path)!r} is not a nestedtrain checkpoint (no {CHECKPOINT_FORMAT!r} marker): "
            "give checkpoints/last.pt or best.pt of a run folder"
        )
    return state


def load_resume_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    agree: Callable[[bool], bool] | None = None,
) -> tuple[dict[str, Any], Path, str | None]:
    """The checkpoint to resume from: ``path`` (``last.pt``), else the one it replaced.

    Args:
        agree: under torchrun, ``agree(read)`` says whether every rank read ``path`` (each
            rank calls it once, with whether it could); if one could not, all fall back.

    Returns:
        ``(state, the file read, a one-line note when it fell back, else None)``.

    Raises:
        ConfigError: neither file is a readable nestedtrain checkpoint.
    """
    path = Path(path)
    previous = previous_path(path)
    try:
        state, error = load_checkpoint(path, map_location), None
    except ValueError as err:
        state, error = None, err
    everywhere = agree(state is not None) if agree is not None else state is not None
    if everywhere:
        return state, path, None
    if error is None:
        reason = "another rank could not read it"
    elif not previous.is_file():
        raise error
    else:
        reason = str(error)
    del state
    state = load_checkpoint(previous, map_location)
    note = f"resuming from {previous} instead: {reason}"
    return state, previous, note


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu", key: str = "model"
) -> tuple[nn.Module, DictConfig, dict[str, Any]]:
    """Rebuild a checkpoint's model with its weights.

    Returns:
        ``(model, config, checkpoint)``; the model is in eval mode.
    """
    from .build import build_model
    from .config import TrainConfig

    state = load_checkpoint(path, map_location)
    # On today's schema: a field added since the run was trained takes its default.
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), state["config"])
    with _no_pretrained(cfg):
        model = build_model(cfg, state["num_classes"], state["in_chans"])
    model.load_state_dict(state[key])
    return model.eval(), cfg, state


class _no_pretrained:
    """Weights come from the checkpoint: never fetch pretrained ones while rebuilding."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def __enter__(self) -> None:
        self.was = self.cfg.model.pretrained
        self.cfg.model.pretrained = False

    def __exit__(self, *exc: object) -> None:
        self.cfg.model.pretrained = self.was
