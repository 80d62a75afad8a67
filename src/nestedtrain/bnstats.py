"""BatchNorm running statistics, with no knowledge of stages or sub-networks: which layers
track them, leaving them alone, copying them per layer, cumulative re-estimation momenta.

The lowest layer: :mod:`nestedtrain.elastic` uses these, and :mod:`nestedtrain.bn` (the
public BN tools) builds on them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "BUFFERS",
    "batchnorms",
    "calibration_mode",
    "frozen_stats",
    "load_layer_stats",
    "save_layer_stats",
    "set_cumulative_momentum",
]


def batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer of ``model`` that tracks running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def calibration_mode(model: nn.Module) -> nn.Module:
    """Eval mode everywhere but in the BatchNorm layers, which train.

    Statistics are then re-estimated from batches while dropout and stochastic depth stay off,
    so the estimate is deterministic and matches what the layers see at evaluation.
    """
    model.eval()
    for bn in batchnorms(model):
        bn.train()
    return model


@contextmanager
def frozen_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Train-mode forwards inside leave every BN's running statistics (and counter) untouched.

    Normalisation still uses the batch statistics in train mode and the running ones in eval
    mode: with ``track_running_stats`` off, a train-mode BN normalises by the batch and writes
    nothing, and an eval-mode BN still reads its buffers because they are not None.
    """
    layers = batchnorms(model)  # a wrapper's modules() include the wrapped model's
    for bn in layers:
        bn.track_running_stats = False
    try:
        yield model
    finally:
        for bn in layers:
            bn.track_running_stats = True


BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def save_layer_stats(layers: Sequence[_BatchNorm]) -> list[tuple[torch.Tensor | None, ...]]:
    """A copy of the buffers of ``layers``, in their order (for :func:`load_layer_stats`)."""
    return [
        tuple(
            None if getattr(m, key) is None else getattr(m, key).detach().clone() for key in BUFFERS
        )
        for m in layers
    ]


def load_layer_stats(
    layers: Sequence[_BatchNorm], stats: Sequence[tuple[torch.Tensor | None, ...]]
) -> None:
    """Put back buffers taken by :func:`save_layer_stats` from the same ``layers``."""
    with torch.no_grad():
        for m, saved in zip(layers, stats):
            for key, value in zip(BUFFERS, saved):
                if value is not None:
                    getattr(m, key).copy_(value)


def set_cumulative_momentum(layers: Sequence[_BatchNorm], seen: int, n: int) -> None:
    """Momentum ``n / (seen + n)`` for the next batch of ``n`` images after ``seen`` images:
    the running update then keeps the exact mean over every image, weighted by batch size
    (torch's ``momentum=None`` averages batches unweighted)."""
    for bn in layers:
        bn.momentum = n / (seen + n)
