"""Top-1/top-5 accuracy and mean cross-entropy: of one network (:func:`evaluate`), and of
sub-networks, BN statistics re-estimated for each (:func:`evaluate_subnets`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..elastic.stages import unwrap
from ..elastic.subnet import Subnet
from ..errors import ConfigError
from ..modes import eval_mode
from .batches import DEFAULT_MEMORY_MB, CalibBatches, EvalBatches
from .passes import parse_subnets, subnet_logits

__all__ = [
    "accuracy_counts",
    "batch_counts",
    "evaluate",
    "evaluate_subnets",
    "metrics_from_counts",
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


def evaluate_subnets(
    model: nn.Module,
    subnets: Sequence[Subnet | str],
    eval_batches: EvalBatches,
    calib_batches: CalibBatches | None,
    chunk_images: int | None = None,
    memory_mb: float | None = DEFAULT_MEMORY_MB,
) -> list[dict]:
    """Accuracy of each sub-network, BN re-calibrated for it: the one sub-network evaluation.

    Shares common prefixes when the model's forward splits into stem, blocks and head, else
    runs one sub-network at a time (:func:`subnet_logits` picks). Returns
    ``[{"subnet", "acc", "acc5", "loss"}]`` in the order of ``subnets`` (accuracies in percent,
    counts all-reduced when distributed). ``calib_batches=None`` keeps the model's own BN
    statistics for every sub-network instead of re-estimating them. ``chunk_images`` and
    ``memory_mb`` bound the memory (see :func:`subnet_logits`), not the result.
    """
    model = unwrap(model)
    subnets = parse_subnets(model, subnets)
    # Each sub-network gets its batches in order, so each sum runs in evaluate's order.
    counts: dict[int, torch.Tensor] = {}

    def consume(indices: list[int], t: int, logits: torch.Tensor, labels: torch.Tensor) -> None:
        leaf = indices[0]
        counts.setdefault(leaf, torch.zeros(4, dtype=torch.float64, device=logits.device))
        counts[leaf] += batch_counts(logits, labels)

    subnet_logits(model, subnets, eval_batches, calib_batches, consume, chunk_images, memory_mb)
    first_index = {}
    for i, subnet in enumerate(subnets):
        first_index.setdefault(subnet, i)
    device = next(model.parameters()).device
    return [
        {"subnet": str(subnet), **metrics_from_counts(counts[first_index[subnet]], device)}
        for subnet in subnets
    ]
