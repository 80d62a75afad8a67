"""Evaluation of one network, and the sub-networks a recipe or command names.

Sub-networks are evaluated (BN re-estimated for each) by
:func:`nestedtrain.engine.subnet_eval.evaluate_subnets`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..elastic.sampling import OrderedSampler
from ..elastic.stages import unwrap
from ..elastic.subnet import Subnet
from ..errors import ConfigError
from ..modes import eval_mode

__all__ = [
    "accuracy_counts",
    "batch_counts",
    "evaluate",
    "metrics_from_counts",
    "select_subnets",
    "space_subnets",
]


def batch_counts(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[top1 correct, top5 correct, images, summed CE]`` of one batch, float64 on the
    logits' device: nothing here waits for the device; the sums are read once, at the end."""
    logits = logits.float()
    k = min(5, logits.shape[1])
    hits = logits.topk(k, dim=1).indices.eq(labels.view(-1, 1))
    return torch.stack(
        [
            hits[:, 0].sum(),
            hits.any(dim=1).sum(),
            torch.full((), labels.numel(), device=logits.device),  # no host-to-device copy
            # summed in float64 image by image: the sum barely depends on how the images
            # are batched (a batch split to fit the memory budget)
            nn.functional.cross_entropy(logits, labels, reduction="none").double().sum(),
        ]
    ).to(torch.float64)


def metrics_from_counts(counts: torch.Tensor, device: torch.device) -> dict[str, float]:
    """Top-1/top-5 (percent) and mean CE from summed counts, all-reduced when distributed."""
    if dist.is_available() and dist.is_initialized():
        counts = counts.to(device)
        dist.all_reduce(counts)
    top1, top5, n, ce = counts.tolist()
    if n == 0:
        raise ConfigError("evaluation got no images")
    return {"acc": 100.0 * top1 / n, "acc5": 100.0 * top5 / n, "loss": ce / n}


@torch.no_grad()
def accuracy_counts(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """``[top1 correct, top5 correct, images, summed CE]`` over ``batches``."""
    counts = torch.zeros(4, dtype=torch.float64)
    for images, labels in batches:
        counts = counts.to(images.device) + batch_counts(model(images), labels)
    return counts


def evaluate(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, float]:
    """Top-1/top-5 (percent) and mean CE; counts all-reduced when distributed.

    The model is evaluated in eval mode and put back in the mode it was in.
    """
    model = unwrap(model)
    with eval_mode(model):
        counts = accuracy_counts(model, batches)
    return metrics_from_counts(counts, next(model.parameters()).device)


def select_subnets(model: nn.Module, spec: str, seed: int = 0) -> list[Subnet]:
    """Sub-networks named by a CLI/recipe string.

    ``none``; ``all`` (the whole ordered space, the full network included); ``sample:N`` (N
    of the ordered space, seeded, always including the shallowest; all of it when it has at
    most N); or a comma-separated list of Subnet strings.
    """
    spec = str(spec).strip()
    if spec in ("none", ""):
        return []
    if spec == "all":
        return space_subnets(model)
    if spec.startswith("sample:"):
        match = re.fullmatch(r"sample:(\d+)", spec)
        if not match or int(match.group(1)) < 1:
            raise ConfigError(f"sub-network selection {spec!r}: write sample:N with N >= 1")
        return space_subnets(model, sample=int(match.group(1)), seed=seed, keep_shallowest=True)
    return [Subnet.parse(unwrap(model), text) for text in spec.split(",")]


def space_subnets(
    model: nn.Module,
    space: Any = None,
    sample: int | None = None,
    seed: int = 0,
    keep_shallowest: bool = False,
) -> list[Subnet]:
    """The ordered sub-networks of a sampling space, or a seeded sample of ``sample`` of them.

    Args:
        model: the main network.
        space: ``None``/``"full"`` (every ordered depth), a name from ``SAMPLING_SPACES``
            (``"space3"``), an int or per-stage list of how many trailing blocks may drop.
        sample: this many, drawn without replacement (all when the space is not larger);
            kept in the space's order, deepest first.
        seed: seeds the sample.
        keep_shallowest: the sample always holds the space's shallowest sub-network (and
            ``sample - 1`` drawn from the rest), as recipes' ``sample:N`` does.
    """
    everything = OrderedSampler(unwrap(model), max_drop=space).all()
    if sample is not None and sample < 1:
        raise ConfigError(f"sample={sample}: evaluate at least 1 sub-network")
    if sample is None or sample >= len(everything):
        return everything
    g = torch.Generator().manual_seed(seed)
    pool = everything[:-1] if keep_shallowest else everything
    picks = torch.randperm(len(pool), generator=g)[: sample - keep_shallowest].sort().values
    chosen = [pool[i] for i in picks.tolist()]
    return [*chosen, everything[-1]] if keep_shallowest else chosen
