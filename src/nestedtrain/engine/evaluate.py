"""Evaluation of the main network and of sub-networks (BN re-calibrated for each)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .. import bn
from ..elastic.sampling import OrderedSampler
from ..elastic.stages import unwrap
from ..elastic.subnet import Subnet, use_subnet
from ..errors import ConfigError
from ..modes import eval_mode, kept_modes

__all__ = [
    "accuracy_counts",
    "batch_counts",
    "evaluate",
    "evaluate_subnets",
    "metrics_from_counts",
    "select_subnets",
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
            nn.functional.cross_entropy(logits, labels, reduction="sum"),
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


def evaluate_subnets(
    model: nn.Module,
    subnets: Sequence[Subnet],
    eval_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    calib_batches: Callable[[], Iterable[torch.Tensor]],
) -> list[dict]:
    """Accuracy of each sub-network after re-estimating BN statistics for it.

    The model's BN statistics and train/eval mode are exactly as they were afterwards.

    Args:
        model: the main network.
        subnets: the sub-networks to evaluate.
        eval_batches: returns a fresh iterable of ``(images, labels)`` each call.
        calib_batches: returns a fresh iterable of training images each call.
    """
    module = unwrap(model)
    saved = bn.save_stats(module)
    results = []
    try:
        with kept_modes(module):
            for subnet in subnets:
                bn.recalibrate(module, calib_batches(), subnet)
                with use_subnet(module, subnet):
                    metrics = evaluate(module, eval_batches())
                results.append({"subnet": str(subnet), **metrics})
    finally:
        bn.load_stats(module, saved)
    return results


def select_subnets(model: nn.Module, spec: str, seed: int = 0) -> list[Subnet]:
    """Sub-networks named by a CLI/recipe string.

    ``none``; ``all`` (the whole ordered space, the full network included); ``sample:N`` (N
    of the ordered space, seeded, always including the shallowest; all of it when it has at
    most N); or a comma-separated list of Subnet strings.
    """
    spec = str(spec).strip()
    if spec in ("none", ""):
        return []
    module = unwrap(model)
    if spec == "all" or spec.startswith("sample:"):
        space = OrderedSampler(module).all()
        if spec == "all":
            return space
        match = re.fullmatch(r"sample:(\d+)", spec)
        if not match or int(match.group(1)) < 1:
            raise ConfigError(f"sub-network selection {spec!r}: write sample:N with N >= 1")
        n = int(match.group(1))
        if n >= len(space):
            return space
        g = torch.Generator().manual_seed(seed)
        rest = space[:-1]
        picks = torch.randperm(len(rest), generator=g)[: n - 1].sort().values.tolist()
        return [rest[i] for i in picks] + [space[-1]]
    return [Subnet.parse(module, text) for text in spec.split(",")]
