"""Checkpoints: written atomically, read back with a clear error for anything foreign."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_save, previous_path
from ..errors import ConfigError
from ..version import __version__

__all__ = [
    "CHECKPOINT_FORMAT",
    "RunState",
    "gather_rng_states",
    "load_checkpoint",
    "load_resume_checkpoint",
    "resolve_checkpoint",
    "restore_run",
    "rng_state",
    "run_checkpoint",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
]

CHECKPOINT_FORMAT = "nestedtrain-checkpoint-v1"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically, keeping the file it replaces as ``*.prev.pt``.

    The new file is complete and synced before the old one is moved aside, so at every moment
    at least one whole checkpoint is on disk: ``path``, or (for the instant between the two
    renames, or if ``path`` is later found damaged) the previous one.
    """
    atomic_save(state, path, keep_previous=True)


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


# ------------------------------------------------------------------------- run state
def rng_state() -> dict[str, Any]:
    """This process's random generators (torch, numpy, Python, CUDA)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def gather_rng_states(group: Any, world_size: int) -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, in rank order (gathered on the host ``group`` under
    torchrun; this process's alone without one)."""
    mine = rng_state()
    if group is None:
        return [mine]
    states: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(states, mine, group=group)
    return states


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class RunState:
    """What a run holds besides its objects' own state: where it is, the best epoch so far,
    and the wall time of earlier processes (resumed runs)."""

    start_epoch: int = 0
    partial: dict[str, Any] | None = None  # a mid-epoch checkpoint's MetricLogger state
    best: dict[str, Any] = field(default_factory=lambda: {"epoch": None, "val_acc": None})
    wall_before: float = 0.0


def run_checkpoint(
    parts: dict[str, Any],
    run: RunState,
    position: tuple[int, int],
    partial: dict[str, Any] | None,
    rng: list[dict[str, Any]],
    wall_seconds: float,
) -> dict[str, Any]:
    """The checkpoint to continue exactly after ``position`` = (epoch, steps done in it): at
    the next epoch's start when ``partial`` (a MetricLogger state) is None, else within the
    epoch.

    Args:
        parts: ``config`` (a plain dict), ``num_classes``, ``in_chans``, ``test_img_size``,
            and the objects with a ``state_dict``: ``model``, ``method``, ``scheduler``,
            ``ema`` (None where the run has none), ``bad_images``.
        rng: every rank's :func:`rng_state`, in rank order.
    """
    epoch, step = position
    resume_at = (
        {"epoch": epoch + 1, "step": 0} if partial is None else {"epoch": epoch, "step": step}
    )
    states = {
        key: parts[key].state_dict() if parts[key] is not None else None
        for key in ("model", "method", "scheduler", "ema", "bad_images")
    }
    return {
        "format": CHECKPOINT_FORMAT,
        # the last epoch whose end (evaluation, log line) is done
        "epoch": epoch if partial is None else epoch - 1,
        "position": resume_at,
        "partial": partial,
        **{key: parts[key] for key in ("config", "num_classes", "in_chans", "test_img_size")},
        **states,
        "rng": rng[0],
        # under torchrun, each rank's: its dropout masks go on from where they were
        "rng_ranks": rng if len(rng) > 1 else None,
        "best": dict(run.best),
        "wall_seconds": wall_seconds,
        "versions": {"nestedtrain": __version__, "torch": torch.__version__},
    }


def restore_run(
    state: dict[str, Any], parts: dict[str, Any], rank: int, world_size: int, seed: int
) -> RunState:
    """Load a :func:`run_checkpoint` into ``parts`` (as given to it) and the RNGs; where the
    run goes on from."""
    parts["model"].load_state_dict(state["model"])
    parts["method"].load_state_dict(state["method"])
    for key in ("scheduler", "ema", "bad_images"):
        if parts[key] is not None and state.get(key) is not None:
            parts[key].load_state_dict(state[key])
    ranks = state.get("rng_ranks")
    if ranks is not None and len(ranks) == world_size:
        set_rng_state(ranks[rank])
    else:
        set_rng_state(state["rng"])
        if rank:  # another number of ranks than the checkpoint's
            torch.manual_seed(seed + rank)
    # checkpoints from before step checkpoints hold only the finished epoch
    position = state.get("position") or {"epoch": state["epoch"] + 1, "step": 0}
    return RunState(
        start_epoch=position["epoch"],
        partial=state.get("partial"),
        best=state["best"],
        wall_before=float(state.get("wall_seconds", 0.0)),
    )
