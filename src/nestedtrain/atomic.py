"""Files written atomically: a temporary file beside the destination, then a rename.

A kill leaves the old file or the new one, never half of one. Every file nestedtrain writes
(run records, checkpoints, exported models, reports) goes through these. The lowest layer.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = ["atomic_append_line", "atomic_save", "atomic_write_text", "previous_path"]


def atomic_save(
    obj: Any,
    path: str | Path,
    saver: Callable[[Any, BinaryIO], None] = torch.save,
    keep_previous: bool = False,
) -> None:
    """Save to a temporary file in the same folder, then rename it over ``path``.

    A crash before the rename leaves the previous file intact; the rename itself is atomic.

    Args:
        obj: what to save.
        path: the destination.
        saver: ``torch.save`` by default; ``torch.jit.save`` for TorchScript.
        keep_previous: move the file it replaces to :func:`previous_path` (after the new one
            is complete and synced, so at every moment one whole file is on disk).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            saver(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, previous_path(path))
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
    """Where ``atomic_save(..., keep_previous=True)`` keeps the file it replaced:
    ``last.pt`` -> ``last.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (temporary file, then rename)."""
    atomic_save(text.encode(), path, saver=lambda data, f: f.write(data))


def atomic_append_line(path: str | Path, line: str) -> None:
    """Add a line to a text file by rewriting it atomically, so a kill leaves the file with
    or without the line, never half of it (for logs of a line per epoch: small files)."""
    path = Path(path)
    before = path.read_text() if path.exists() else ""
    atomic_write_text(path, before + line.rstrip("\n") + "\n")
