"""BatchNorm tools: leave running statistics alone, save/restore them, re-estimate them.

The per-layer helpers are defined in :mod:`nestedtrain.bnstats` (below the elastic layer,
which uses them) and are part of this public module.

Sub-network forwards in train mode would otherwise blend their statistics into the main
network's; and a sub-network is evaluated with statistics re-estimated for it (as the papers
do). Neither replaces a module's forward nor copies the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .bnstats import (
    BUFFERS,
    batchnorms,
    calibration_mode,
    frozen_stats,
    load_layer_stats,
    save_layer_stats,
    set_cumulative_momentum,
)
from .elastic.stages import Stage, find_stages, unwrap
from .elastic.subnet import Subnet, use_subnet
from .errors import ConfigError
from .modes import kept_modes

__all__ = [
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
