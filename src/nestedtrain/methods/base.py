"""What every method step shares: mixed precision, and one gradient sync per optimizer step.

A method is a *step*: given a batch it runs its forwards and backwards and returns numbers to
log; whoever owns the loop (nestedtrain's trainer, or the user's own loop) then steps
``method.optimizer``::

    info = method.step(images, labels)
    method.precision.step(method.optimizer)   # or method.optimizer.step() without AMP
    method.optimizer.zero_grad(set_to_none=True)
    method.after_optimizer_step(info)
    ...
    method.on_epoch_end(epoch)
"""

from __future__ import annotations

import abc
import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..elastic.stages import unwrap
from ..errors import ConfigError
from ..losses import cross_entropy

__all__ = ["MethodStep", "Precision"]


class Precision:
    """Autocast and gradient scaling in one place, so methods never hard-code CUDA or fp16.

    Args:
        device: where the model runs.
        amp: use automatic mixed precision (only on CUDA; ignored on the CPU).
        dtype: ``"bfloat16"`` or ``"float16"``; float16 adds a GradScaler.
    """

    def __init__(
        self, device: torch.device | str = "cpu", amp: bool = False, dtype: str = "bfloat16"
    ):
        self.device = torch.device(device)
        if dtype not in ("bfloat16", "float16"):
            raise ConfigError(f"amp dtype {dtype!r} must be 'bfloat16' or 'float16'")
        self.enabled = bool(amp) and self.device.type == "cuda"
        self.dtype = getattr(torch, dtype)
        use_scaler = self.enabled and self.dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, clip_grad: float | None = None) -> None:
        """Unscale, clip the global gradient norm if asked, and step the optimizer."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if clip_grad:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


class MethodStep(abc.ABC):
    """Base of the method steps: holds the model, optimizer and precision; the epoch counter.

    Subclasses implement :meth:`step`. ``model`` may be wrapped in DistributedDataParallel: a
    step that runs several backwards all-reduces gradients once per step (see
    :mod:`nestedtrain.methods.runners`).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        precision: Precision | None = None,
        label_smoothing: float = 0.0,
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ):
        self.model = model
        self.optimizer = optimizer
        self.precision = precision or Precision("cpu")
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing={label_smoothing} must be in [0, 1)")
        # The supervised loss on labels (hard or soft): CE by default, timm's BCE for A3 recipes.
        self.criterion = criterion or functools.partial(
            cross_entropy, label_smoothing=label_smoothing
        )
        self.epoch = 0

    @property
    def module(self) -> nn.Module:
        """The model without its DDP wrapper."""
        return unwrap(self.model)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Every optimizer the method owns; the learning-rate schedule drives all of them."""
        return [self.optimizer]

    @abc.abstractmethod
    def step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """Run this method's forwards and backwards on one batch; return numbers to log."""

    def after_optimizer_step(self, info: dict[str, Any]) -> None:
        """Called by the loop after the optimizer stepped."""

    @property
    def reestimates_main_bn(self) -> bool:
        """Whether the loop re-estimates the main network's BN statistics from training
        images before evaluating (when the method's forwards moved them)."""
        return False

    @property
    def recalibrated_models(self) -> tuple[str, ...]:
        """Names of :meth:`extra_models` whose BN statistics are not their own (motivation's
        motivated model): the loop evaluates and saves them with statistics re-estimated from
        training images (``bn.recalibrated``), and logs their raw accuracy beside."""
        return ()

    def extra_models(self) -> dict[str, nn.Module]:
        """Models besides the main one that the loop evaluates each epoch (logged as
        ``<name>_acc``) and saves at the end (``<name>.pt``, a plain state_dict)."""
        return {}

    def epoch_metrics(self) -> dict[str, Any]:
        """Numbers about the epoch just trained, merged into its ``metrics.jsonl`` line."""
        return {}

    def summary_extras(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Entries to add to ``summary.json``, given the summary so far."""
        return {}

    def on_epoch_end(self, epoch: int) -> None:
        """Called by the loop after training epoch ``epoch`` (0-based)."""
        self.epoch = epoch + 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "optimizer": self.optimizer.state_dict(),
            "precision": self.precision.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.precision.load_state_dict(state["precision"])
