"""Common training (CT): cross-entropy on the main network, the baseline of every paper."""

from __future__ import annotations

from typing import Any

import torch

from .base import MethodStep

__all__ = ["CommonTraining"]


class CommonTraining(MethodStep):
    """One forward and one backward of the main network per step.

    ``step`` returns the loss terms as detached 0-dim tensors on the model's device, so that
    it never waits for the device; read them (``float(info["loss"])``) only when logging.

    Args:
        model: the network (optionally DDP-wrapped).
        optimizer: its optimizer.
        precision: autocast/grad scaling; plain fp32 by default.
        label_smoothing: for hard labels.
        criterion: ``(logits, targets) -> loss``; CE with ``label_smoothing`` when None.
    """

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        with self.precision.autocast():
            logits = self.model(images)
        ce = self.criterion(logits.float(), labels)
        self.precision.backward(ce)
        ce = ce.detach()  # loss terms stay on the device: reading them would stall the step
        return {"loss": ce, "ce": ce, "kl": torch.zeros_like(ce), "subnets": []}
