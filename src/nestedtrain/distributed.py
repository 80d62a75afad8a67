"""Process-group setup for torchrun, DDP wrapping, and the collectives training needs.

The lowest layer: methods call the collectives inside a step (motivation training agrees on
every switch), the engine calls them between steps and sets up the ranks. Outside a process
group each collective does nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from timm.utils import distribute_bn, unwrap_model
from torch import nn

from .errors import ConfigError

__all__ = [
    "DistInfo",
    "all_ranks",
    "all_reduce_mean",
    "average_bn",
    "barrier",
    "configure_cuda",
    "control_group",
    "end_distributed",
    "init_distributed",
    "input_memory_format",
    "pick_device",
    "wrap_ddp",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: this rank's GPU when CUDA is there, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"device={name!r} is not a device: use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here: use device=auto or cpu")
    return device


def init_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun set up (gloo on the CPU, nccl on GPUs), if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(), pick_device(device_name)
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(device_name, info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def end_distributed() -> None:
    """Leave the process group (the one :func:`init_distributed` joined), if any.

    Before the interpreter exits: left to it, a gloo group's threads are torn down with the
    process and can abort it ("terminate called without an active exception", status -6)
    after it has said why it stops, when another rank has gone first.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def configure_cuda(device: torch.device) -> None:
    """On CUDA, let cuDNN pick the fastest convolution algorithm per input shape and let
    float32 matmuls and convolutions run on TF32 tensor cores (as timm's train script does).

    Both trade bitwise reproducibility on the GPU for speed; the CPU, where nestedtrain
    promises identical results for one seed, is left as it is.
    """
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def input_memory_format(device: torch.device, channels_last: bool) -> torch.memory_format:
    """The memory format of the model's weights and of every input it is given, in training
    and evaluation alike: channels-last on CUDA when the recipe asks for it (its convolutions
    are faster so), else torch's default (the CPU is left as it is)."""
    if device.type == "cuda" and channels_last:
        return torch.channels_last
    return torch.contiguous_format


def control_group() -> dist.ProcessGroup | None:
    """A gloo group for the host-side flags ranks agree on between steps (stop, save).

    Its collectives run on CPU tensors, so agreeing never waits for a GPU stream; None when
    not distributed. Every rank must call this, in the same order.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.new_group(backend="gloo")


def wrap_ddp(
    model: nn.Module,
    info: DistInfo,
    device: torch.device,
    find_unused_parameters: bool = False,
) -> nn.Module:
    """``model`` in DistributedDataParallel under torchrun, else itself.

    Args:
        find_unused_parameters: true when a synchronised backward may leave parameters
            without gradients (a sub-network's skipped blocks); DDP then walks the autograd
            graph after every synchronised forward to find them.
    """
    if not info.enabled:
        return model
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
        # In a synchronised backward the gradients are views into DDP's buckets, not a second
        # copy of them. DDP allocates the buckets (one gradient's worth) when it wraps the
        # model, whatever the step does: the shared-prefix ST step, which backpropagates
        # under no_sync after zero_grad(set_to_none=True), gets fresh gradient tensors and
        # all-reduces them by hand, so it still pays for the buckets, unused.
        gradient_as_bucket_view=True,
    )


def average_bn(models: list[nn.Module], info: DistInfo) -> None:
    """Average the BN running statistics of ``models`` (each once) over the ranks.

    Each rank's forwards move them with its own images, and DDP broadcasts rank 0's buffers
    only at the start of a synchronised forward (the shared-prefix ST step runs none), so ranks
    drift apart. The trainer calls this before every evaluation, where each rank evaluates its
    shard, and every save, where rank 0 writes.
    """
    if not info.enabled:
        return
    seen: set[int] = set()
    for model in map(unwrap_model, models):
        if id(model) not in seen:  # motivation's base model is the main one
            seen.add(id(model))
            distribute_bn(model, info.world_size, reduce=True)


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
