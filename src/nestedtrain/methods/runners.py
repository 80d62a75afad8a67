"""How a step's networks run and are backpropagated: the main network, then its drawn
sub-networks, each sub-network backpropagated as soon as its term is computed, so memory does
not grow with their number.

A runner has one method, ``run``: the step says what the losses are (:class:`StepLoss`), the
runner computes them and owns every ``backward``. :class:`PlainRunner` runs each sub-network
whole; :class:`~nestedtrain.methods.shared_prefix.SharedPrefixRunner` computes what they
share with the main network (and with each other) once.

Under DDP the plain runner lets only the step's last backward all-reduce; a runner that
backpropagates in parts accumulates locally (:func:`local_gradients`) and all-reduces once, by
hand (:func:`all_reduce_gradients`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..bn import frozen_stats
from ..elastic.stages import Stage
from ..elastic.subnet import Subnet, use_subnet
from .base import Precision

__all__ = [
    "Drawn",
    "PlainRunner",
    "StepLoss",
    "all_reduce_gradients",
    "local_gradients",
    "main_backward",
    "resized",
    "sync_gradients",
    "whole_backward",
]


class Drawn(NamedTuple):
    """A sub-network drawn for a step, and the side of the (square) input it sees."""

    subnet: Subnet
    side: int


class StepLoss(Protocol):
    """What a step's losses are: ``ce + lam · Σ_j term_j``."""

    lam: float

    def ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The main network's supervised loss."""

    def term(
        self, sub_logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """One sub-network's term (before ``lam``); ``teacher``: the main logits, detached."""


def resized(images: torch.Tensor, side: int) -> torch.Tensor:
    """``images`` resized (bilinear) to ``side`` × ``side``; themselves at their own side."""
    if side == images.shape[-1]:
        return images
    return F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)


def main_backward(
    model: nn.Module,
    precision: Precision,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss: StepLoss,
    same_as_main: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The main network's forward and the backward of its CE plus the terms of the
    ``same_as_main`` drawn sub-networks that are the main network itself (one backward).
    Returns the detached CE, the teacher logits and those terms (detached)."""
    with precision.autocast():
        logits = model(images).float()
    ce = loss.ce(logits, labels)
    teacher = logits.detach()
    total, terms = ce, []
    for _ in range(same_as_main):
        term = loss.term(logits, teacher, labels)
        terms.append(term.detach())
        total = total + loss.lam * term
    precision.backward(total)
    # Loss terms stay on the device: reading them would stall the step.
    return ce.detach(), teacher, terms


def whole_backward(
    model: nn.Module,
    stages: Sequence[Stage] | None,
    precision: Precision,
    subnet: Subnet,
    inputs: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    loss: StepLoss,
    protect_bn: bool = True,
) -> torch.Tensor:
    """One sub-network's forward on ``inputs`` and the backward of its weighted term;
    returns the term (detached). ``protect_bn``: leave BN running statistics to the main
    network (else the forward updates them, as the ST reference code does)."""
    bn_guard = frozen_stats if protect_bn else contextlib.nullcontext
    with use_subnet(model, subnet, stages), bn_guard(model):
        with precision.autocast():
            sub_logits = model(inputs).float()
    term = loss.term(sub_logits, teacher, labels)
    precision.backward(loss.lam * term)
    return term.detach()


class PlainRunner:
    """The main network, then each sub-network whole, each backpropagated at once.

    Args:
        model: the main network (optionally DDP-wrapped).
        precision: autocast and backward scaling.
        stages: the model's stages (found again on each sub-network when None).
        protect_bn: sub-network forwards leave BN running statistics alone.
    """

    def __init__(
        self,
        model: nn.Module,
        precision: Precision,
        stages: Sequence[Stage] | None = None,
        protect_bn: bool = True,
    ):
        self.model, self.precision, self.stages = model, precision, stages
        self.protect_bn = protect_bn

    def run(
        self, images: torch.Tensor, labels: torch.Tensor, drawn: Sequence[Drawn], loss: StepLoss
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Backpropagate ``loss`` for the main network and the ``drawn`` sub-networks;
        returns the detached CE and the terms, stacked in draw order."""
        with sync_gradients(self.model, last=not drawn):
            ce, teacher, _ = main_backward(self.model, self.precision, images, labels, loss)
        terms = []
        for j, (subnet, side) in enumerate(drawn):
            inputs = resized(images, side)
            with sync_gradients(self.model, last=j == len(drawn) - 1):
                term = whole_backward(
                    self.model,
                    self.stages,
                    self.precision,
                    subnet,
                    inputs,
                    teacher,
                    labels,
                    loss,
                    self.protect_bn,
                )
            terms.append(term)
        return ce, _stacked(terms, ce)


def _stacked(terms: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """``terms`` as one 1-dim tensor (empty, like ``like``, when there are none)."""
    return torch.stack(terms) if terms else like.new_zeros(0)


# ------------------------------------------------------------------------------ under DDP
def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


@contextlib.contextmanager
def sync_gradients(model: nn.Module, last: bool) -> Iterator[None]:
    """Wrap one forward+backward: under DDP only the ``last`` of a step all-reduces."""
    if last or not _is_ddp(model):
        yield
    else:
        with model.no_sync():
            yield


@contextlib.contextmanager
def local_gradients(model: nn.Module) -> Iterator[None]:
    """Every backward inside accumulates locally, also under DDP; then call
    :func:`all_reduce_gradients` once."""
    if _is_ddp(model):
        with model.no_sync():
            yield
    else:
        yield


def all_reduce_gradients(model: nn.Module) -> None:
    """Average the gradients over the DDP ranks, as DDP's own backward does (no-op without
    DDP).

    By hand because DDP's reducer syncs during one backward through the graph of one DDP
    forward, and a step that computes shared prefixes once backpropagates in several parts.
    Gradients go in buckets of 25 MiB (DDP's default), all in flight at once. Every rank
    draws the same sub-networks, so the same parameters have gradients.
    """
    if not _is_ddp(model):
        return
    group = model.process_group
    world = torch.distributed.get_world_size(group)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    pending = []
    for bucket in _buckets(grads, 25 * 2**20):
        flat = torch.cat([g.reshape(-1) for g in bucket]).div_(world)
        pending.append(
            (bucket, flat, torch.distributed.all_reduce(flat, group=group, async_op=True))
        )
    for bucket, flat, work in pending:
        work.wait()
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def _buckets(grads: list[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """Consecutive gradients of one dtype and device, at most ``limit`` bytes a bucket (but
    at least one gradient)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        last = buckets[-1] if buckets else None
        kind = (g.dtype, g.device)
        if last is None or size + nbytes > limit or kind != (last[0].dtype, last[0].device):
            buckets.append([g])
            size = nbytes
        else:
            last.append(g)
            size += nbytes
    return buckets
