"""Motivation training (Algorithm 1 of "Motivation Is Something You Need") as one step object.

Two models of one family: a small *base* model and a larger *motivated* model that contains it
(``WeightMap`` says where). A flag, ``motivated``, starts false; each step trains the active
model with its own optimizer; after the step a motivation condition decides whether the next
step is motivated. On a switch to the motivated model the base model's weights, buffers and
optimizer state are copied into their slices of the motivated model; on the switch back they
are copied the other way. Every epoch ends on the base model. The weights only the motivated
model has (its *differential* weights) and their optimizer state therefore change only during
motivated steps.

A run yields two models to deploy: the base model and the motivated one.

In your own loop, build it from plain objects (``nestedtrain train`` builds it from a recipe)
and drive it as every method step (see ``nestedtrain.methods.base``)::

    base, motivated = create_model("resnet20"), create_model("resnet32")
    condition = build_condition("loss_decrease", 2, len(loader), torch.Generator())
    method = MotivationTraining(
        base, motivated, SGD(base.parameters(), lr=0.1), SGD(motivated.parameters(), lr=0.1),
        condition,
    )
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..distributed import all_reduce_mean
from ..elastic.stages import unwrap
from ..elastic.weightmap import WeightMap
from ..errors import ConfigError
from ..losses import cross_entropy
from ..modes import eval_mode
from .base import MethodStep, Precision
from .conditions import Condition

__all__ = ["MotivationTraining"]

_COUNTERS = ("motivated_steps", "base_steps", "switches")


class MotivationTraining(MethodStep):
    """Algorithm 1: train the base model, or the motivated model while the condition holds.

    ``model`` and ``optimizer`` are the *active* ones (read from the ``motivated`` flag), so a
    loop that steps ``method.optimizer`` after ``method.step`` trains whichever model ran.
    ``optimizers`` lists the base optimizer first: a learning-rate schedule drives it and the
    loop copies its rates into the motivated optimizer.

    Args:
        base: the base model (optionally DDP-wrapped).
        motivated: the motivated model, larger in some stage or dimension (optionally
            DDP-wrapped).
        base_optimizer: the base model's optimizer.
        motivated_optimizer: the motivated model's optimizer, of the same class.
        condition: decides after each step whether the next one is motivated (see
            ``nestedtrain.methods.conditions``).
        val_batch: ``(images, labels)`` held out of training, for a condition that needs
            ``val_loss``: after each step, the active model's loss on it (eval mode).
        weight_map: where the base sits in the motivated model; built from the two models
            with ``qkv`` when None.
        qkv: how a ViT's fused qkv projection is mapped (see ``WeightMap``).
        precision: autocast/grad scaling; plain fp32 by default.
        label_smoothing: for hard labels.
        criterion: ``(logits, targets) -> loss``; CE with ``label_smoothing`` when None.
        reestimate_bn: evaluate and save the motivated model with BN statistics re-estimated
            from training images (:attr:`recalibrated_models`). Its BN buffers are the base
            model's, copied at each switch, and it runs few steps itself, so its own
            statistics lag behind what its extra blocks make of their inputs. Training is the
            same either way.

    Raises:
        ConfigError: models the WeightMap cannot pair, optimizers of different classes, or a
            condition that needs ``val_loss`` without a ``val_batch``.
    """

    def __init__(
        self,
        base: nn.Module,
        motivated: nn.Module,
        base_optimizer: torch.optim.Optimizer,
        motivated_optimizer: torch.optim.Optimizer,
        condition: Condition,
        *,
        val_batch: tuple[torch.Tensor, torch.Tensor] | None = None,
        weight_map: WeightMap | None = None,
        qkv: str = "split",
        precision: Precision | None = None,
        label_smoothing: float = 0.0,
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        reestimate_bn: bool = True,
    ):
        # MethodStep.__init__ is not called: it assigns ``model`` and ``optimizer``, which are
        # read from the ``motivated`` flag here.
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing={label_smoothing} must be in [0, 1)")
        if type(base_optimizer) is not type(motivated_optimizer):
            raise ConfigError(
                f"base and motivated optimizers must be of one class to share their state, got "
                f"{type(base_optimizer).__name__} and {type(motivated_optimizer).__name__}"
            )
        if "val_loss" in condition.needs and val_batch is None:
            raise ConfigError(
                f"the {condition.name} condition needs val_batch=(images, labels), a batch held "
                "out of training"
            )
        self.precision = precision or Precision("cpu")
        self.criterion = criterion or functools.partial(
            cross_entropy, label_smoothing=label_smoothing
        )
        self.epoch = 0
        self.weight_map = weight_map or WeightMap(base, motivated, qkv=qkv)
        self._models = (base, motivated)
        self._optimizers = (base_optimizer, motivated_optimizer)
        self.condition = condition
        self.val_batch = val_batch
        self.motivated = False  # Algorithm 1, line 1
        self.reestimate_bn = bool(reestimate_bn)
        self._counts = dict.fromkeys(_COUNTERS, 0)  # the epoch being trained
        self._last_epoch = dict.fromkeys(_COUNTERS, 0)  # the epoch last finished
        self._totals = dict.fromkeys(_COUNTERS, 0)  # the whole run

    # ------------------------------------------------------------------------------ models
    @property
    def model(self) -> nn.Module:
        """The active model (as given, possibly DDP-wrapped)."""
        return self._models[self.motivated]

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The active model's optimizer."""
        return self._optimizers[self.motivated]

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return list(self._optimizers)

    @property
    def base_model(self) -> nn.Module:
        return unwrap(self._models[0])

    @property
    def motivated_model(self) -> nn.Module:
        return unwrap(self._models[1])

    def extra_models(self) -> dict[str, nn.Module]:
        return {"base": self.base_model, "motivated": self.motivated_model}

    @property
    def recalibrated_models(self) -> tuple[str, ...]:
        return ("motivated",) if self.reestimate_bn else ()

    # -------------------------------------------------------------------------------- step
    def step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """Forward and backward of the active model (Algorithm 1, lines 7-13)."""
        with self.precision.autocast():
            logits = self.model(images)
        loss = self.criterion(logits.float(), labels)
        self.precision.backward(loss)
        info: dict[str, Any] = {
            "loss": loss.detach(),
            "model": "motivated" if self.motivated else "base",
        }
        if "grad_norm" in self.condition.needs:
            info["grad_norm"] = self._grad_norm()
        return info

    def after_optimizer_step(self, info: dict[str, Any]) -> None:
        """Count the step, update the condition, and switch models if it says so (lines
        19-37)."""
        self._count("motivated_steps" if self.motivated else "base_steps")
        # Algorithm 1 branches on the loss after every step, so motivation training reads it
        # on the host here: the one device synchronisation per step this method needs.
        values = {"loss": float(info["loss"])}
        if "grad_norm" in self.condition.needs:
            values["grad_norm"] = float(info["grad_norm"])
        if "val_loss" in self.condition.needs:
            values["val_loss"] = self._val_loss()
        # Every rank must switch together: the condition sees the mean over ranks.
        values = all_reduce_mean(values, self._device())
        loss = values.pop("loss")
        wants_motivated = self.condition.update(loss, **values)
        if wants_motivated != self.motivated:
            self._switch(wants_motivated)

    def on_epoch_end(self, epoch: int) -> None:
        """End the epoch on the base model (lines 39-43) and close its counts."""
        super().on_epoch_end(epoch)
        if self.motivated:
            self._switch(False)
        self.condition.on_epoch_end()
        self._last_epoch = self._counts
        self._counts = dict.fromkeys(_COUNTERS, 0)

    def _switch(self, to_motivated: bool) -> None:
        base, motivated = self.base_model, self.motivated_model
        base_opt, motivated_opt = self._optimizers
        if to_motivated:
            self.weight_map.copy_to_motivated(base, motivated)
            self.weight_map.copy_optimizer_state(base_opt, motivated_opt, "to_motivated")
            motivated.train(base.training)
            self._count("switches")
        else:
            self.weight_map.copy_to_base(motivated, base)
            self.weight_map.copy_optimizer_state(motivated_opt, base_opt, "to_base")
            base.train(motivated.training)
        self.motivated = to_motivated

    def _count(self, key: str) -> None:
        self._counts[key] += 1
        self._totals[key] += 1

    def _device(self) -> torch.device:
        first = next(self.model.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def _grad_norm(self) -> float:
        """The Euclidean norm of all of the active model's gradients (unscaled under AMP)."""
        grads = [p.grad.detach() for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
        ).item()
        if self.precision.scaler is not None:
            norm /= self.precision.scaler.get_scale()
        return norm

    @torch.no_grad()
    def _val_loss(self) -> float:
        """The active model's loss on the held-out batch, in eval mode (statistics untouched)."""
        images, labels = self.val_batch
        with eval_mode(unwrap(self.model)) as model, self.precision.autocast():
            logits = model(images)
        return self.criterion(logits.float(), labels).item()

    # ------------------------------------------------------------------------------- logs
    def epoch_metrics(self) -> dict[str, Any]:
        """``motivated_steps``, ``base_steps`` and ``switches`` (to the motivated model) of the
        epoch just trained, and ``motivated_share``, the fraction of its steps that were
        motivated."""
        counts = dict(self._last_epoch)
        steps = counts["motivated_steps"] + counts["base_steps"]
        counts["motivated_share"] = counts["motivated_steps"] / steps if steps else 0.0
        return counts

    def summary_extras(self, summary: dict[str, Any]) -> dict[str, Any]:
        """``flops_per_image`` (F_X-Y: mean forward FLOPs of a training step, from the run's
        step counts and ``flops_base``/``flops_motivated``) and the run's total counts."""
        from ..flops import motivation_flops

        n_base, n_mot = self._totals["base_steps"], self._totals["motivated_steps"]
        f_base, f_mot = summary.get("flops_base"), summary.get("flops_motivated")
        flops = None
        if n_base + n_mot > 0 and f_base is not None and f_mot is not None:
            flops = motivation_flops(n_base, n_mot, f_base, f_mot)
        return {
            "flops_per_image": flops,
            **self._totals,
            "condition": self.condition.name,
            "k": getattr(self.condition, "k", None),
        }

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything but the base model's weights (the trainer's checkpoint holds them; while
        motivated, the live base weights are the motivated model's slices anyway)."""
        return {
            "epoch": self.epoch,
            "precision": self.precision.state_dict(),
            "motivated": self.motivated,
            "motivated_model": self.motivated_model.state_dict(),
            "base_optimizer": self._optimizers[0].state_dict(),
            "motivated_optimizer": self._optimizers[1].state_dict(),
            "condition": self.condition.state_dict(),
            "counts": dict(self._counts),
            "last_epoch": dict(self._last_epoch),
            "totals": dict(self._totals),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in ("motivated_model", "condition", "totals") if k not in state]
        if missing:
            raise ConfigError(
                f"not the state of a motivation run: it lacks {missing}; resume a run trained "
                "with method=motivation"
            )
        self.epoch = state["epoch"]
        self.precision.load_state_dict(state["precision"])
        self.motivated = bool(state["motivated"])
        self.motivated_model.load_state_dict(state["motivated_model"])
        self._optimizers[0].load_state_dict(state["base_optimizer"])
        self._optimizers[1].load_state_dict(state["motivated_optimizer"])
        self.condition.load_state_dict(state["condition"])
        self._counts = dict(state["counts"])
        self._last_epoch = dict(state["last_epoch"])
        self._totals = dict(state["totals"])
