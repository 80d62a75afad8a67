"""The collectives a training step needs, as plain ``torch.distributed`` calls.

The lowest layer: methods call them inside a step (motivation training agrees on every switch),
the engine between steps. Outside a process group each one does nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_ranks", "all_reduce_mean", "barrier"]


def all_ranks(
    flag: bool, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu"
) -> bool:
    """Whether ``flag`` holds on every rank of ``group`` (``flag`` when not distributed).

    For a choice each rank makes on what it sees alone (a probe, a file it read): the ranks
    take the same branch, so their collectives stay paired. ``device`` must suit the group's
    backend (the CPU for gloo, this rank's GPU for nccl).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=group)
    return bool(tensor.item())


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean over ranks of each value (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return dict(zip(keys, tensor.tolist()))


def barrier() -> None:
    """Wait for every rank (nothing to wait for when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
