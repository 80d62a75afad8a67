"""BatchNorm tools: which layers track running statistics, leaving those alone, saving and
restoring them, re-estimating them for the whole model or one sub-network.

Sub-network forwards in train mode would otherwise blend their statistics into the main
network's; and a sub-network is evaluated with statistics re-estimated for it (as the papers
do). Neither replaces a module's forward nor copies the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .elastic.stages import Stage, find_stages, unwrap
from .elastic.subnet import Subnet, use_subnet
from .errors import ConfigError
from .modes import kept_modes

__all__ = [
    "BUFFERS",
    "batchnorms",
    "calibration_mode",
    "frozen_stats",
    "load_layer_stats",
    "load_stats",
    "recalibrate",
    "recalibrated",
    "save_layer_stats",
    "save_stats",
    "set_cumulative_momentum",
]

# A BN layer's running-statistics buffers, as named in its state_dict.
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


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


def save_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every BN buffer (running mean/var, batch counter), by state_dict name."""
    model = unwrap(model)
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for bn in batchnorms(model):
        prefix = names[id(bn)]
        for key in BUFFERS:
            buf = getattr(bn, key, None)
            if buf is not None:
                out[f"{prefix}.{key}" if prefix else key] = buf.detach().clone()
    return out


def load_stats(model: nn.Module, stats: dict[str, torch.Tensor]) -> None:
    """Put back statistics taken by :func:`save_stats`."""
    buffers = dict(unwrap(model).named_buffers())
    with torch.no_grad():
        for name, value in stats.items():
            buffers[name].copy_(value)


def _skipped_batchnorms(stages: Sequence[Stage], subnet: Subnet) -> set[int]:
    skipped = set()
    for stage, kept in zip(stages, subnet.blocks):
        for i, block in enumerate(stage.blocks):
            if i not in kept:
                skipped.update(id(m) for m in block.modules())
    return skipped


@torch.no_grad()
def recalibrate(
    model: nn.Module,
    batches: Iterable[torch.Tensor | Sequence[torch.Tensor]],
    subnet: Subnet | str | None = None,
) -> nn.Module:
    """Re-estimate BN running statistics from ``batches`` and leave the model in eval mode.

    The estimate is cumulative: each BN ends with the exact mean of the per-batch means (and
    unbiased variances) weighted by batch size, i.e. the mean over every image it saw. With a
    ``subnet`` only the BNs that the sub-network runs are reset and re-estimated; those of
    skipped blocks keep their statistics.

    Args:
        model: the model (a DDP wrapper is looked through).
        batches: image tensors, or ``(images, labels)`` pairs whose first item is used.
        subnet: the sub-network to calibrate for; ``None`` for the whole model.

    Returns:
        ``model``, in eval mode.
    """
    model = unwrap(model)
    layers = batchnorms(model)
    if subnet is not None:
        stages = find_stages(model)
        subnet = Subnet.from_string(subnet) if isinstance(subnet, str) else subnet
        skipped = _skipped_batchnorms(stages, subnet)
        layers = [bn for bn in layers if id(bn) not in skipped]
    momenta = [bn.momentum for bn in layers]
    for bn in layers:
        bn.reset_running_stats()
    calibration_mode(model)
    seen = 0
    try:
        for batch in batches:
            images = batch if isinstance(batch, torch.Tensor) else batch[0]
            n = images.shape[0]
            set_cumulative_momentum(layers, seen, n)
            if subnet is None:
                model(images)
            else:
                with use_subnet(model, subnet):
                    model(images)
            seen += n
    finally:
        for bn, momentum in zip(layers, momenta):
            bn.momentum = momentum
        model.eval()
    if seen == 0:
        raise ConfigError("recalibrate got no batches: pass at least one batch of images")
    return model


@contextmanager
def recalibrated(
    model: nn.Module,
    batches: Iterable[torch.Tensor | Sequence[torch.Tensor]],
    subnet: Subnet | str | None = None,
) -> Iterator[nn.Module]:
    """Inside, ``model`` (unwrapped, in eval mode) has BN statistics re-estimated from
    ``batches`` (:func:`recalibrate`); on exit its own statistics and every module's mode come
    back, so a training run goes on exactly as without it.

    For a model whose statistics are not its own, such as motivation training's motivated
    model, which shares the base model's BN buffers and runs few steps itself::

        with bn.recalibrated(method.motivated_model, data.calibration_batches()) as model:
            accuracy = evaluate(model, data.eval_batches("test"))["acc"]
    """
    module = unwrap(model)
    saved = save_stats(module)
    # Calibration runs with dropout and drop-path off, so it draws no random numbers; the
    # global generator is forked all the same, so that nothing a batch source draws (a loader
    # seeding its workers) can move the run's later masks.
    with kept_modes(module), torch.random.fork_rng(devices=[]):
        recalibrate(module, batches, subnet)
        try:
            yield module
        finally:
            load_stats(module, saved)
