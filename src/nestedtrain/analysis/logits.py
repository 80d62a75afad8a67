"""Logit amplitude: the mean L2 norm of a network's logits over a dataset (Fig. 4 of ST++).

Networks of one family that differ in capacity end training with logits of different
magnitude; ST++ removes the magnitude from its distillation loss (KL⁻) for that reason.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ..elastic.stages import unwrap
from ..errors import ConfigError
from ..modes import eval_mode

__all__ = ["logit_norms"]


@torch.no_grad()
def logit_norms(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, float]:
    """Mean and standard deviation of the per-image L2 norm of the logits, and top-1.

    The model runs in eval mode and is put back in the mode it was in.

    Returns:
        ``{"mean_norm", "std_norm", "acc", "images"}`` (accuracy in percent).
    """
    model = unwrap(model)
    total = total_sq = correct = count = 0.0
    with eval_mode(model):
        for images, labels in batches:
            logits = model(images).float()
            norms = logits.norm(dim=1).double()
            total += norms.sum().item()
            total_sq += (norms**2).sum().item()
            correct += (logits.argmax(dim=1) == labels).sum().item()
            count += labels.numel()
    if count == 0:
        raise ConfigError("logit_norms got no images")
    mean = total / count
    return {
        "mean_norm": mean,
        "std_norm": math.sqrt(max(total_sq / count - mean**2, 0.0)),
        "acc": 100.0 * correct / count,
        "images": int(count),
    }
