"""Motivation conditions: when the motivated model trains instead of the base model.

A condition sees each training step once, after it: ``update(loss, **extra)`` gets that step's
loss (of whichever model was active; in a distributed run, the all-reduced loss) and returns
whether the *next* step is a motivated step. Conditions are pure functions of what they are
given (and of their own ``torch.Generator``), so every process of a distributed run agrees.

The trainer ends every epoch on the base model (Algorithm 1, lines 39-43): whatever the last
``update`` of an epoch returned, the first step of the next epoch is a base step. The streak
conditions keep their counters across that forced switch, as Algorithm 1 does, so when the
first step of an epoch improves on the last step of the previous one, the count goes on
rising past k and the step after it is motivated again.

Every streak condition starts from the worst previous value (Algorithm 1 sets the previous
loss to +inf), so the very first step counts as an improvement.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import torch

from ..errors import ConfigError
from ..records import read_metrics

__all__ = [
    "Condition",
    "LossDecrease",
    "EMA",
    "ValLoss",
    "GradSlope",
    "RandomA",
    "RandomB",
    "CONDITIONS",
    "build_condition",
    "read_motivated_steps",
    "mean_motivated_steps",
]

PathLike = Union[str, Path]


class Condition(abc.ABC):
    """Interface of a motivation condition (see the module docstring).

    Attributes:
        needs: names of the extra values ``update`` requires besides the loss, which the
            method step must compute (``"val_loss"``, ``"grad_norm"``).
    """

    name = "condition"
    needs: frozenset[str] = frozenset()

    @abc.abstractmethod
    def update(self, loss: float, **extra: float) -> bool:
        """Record one finished step; return whether the next step is motivated."""

    def on_epoch_end(self) -> None:
        """Called once after an epoch's last step (the trainer then forces the base model)."""

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """Everything needed to resume exactly: plain Python values and tensors."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""

    def _state(self, **values: Any) -> dict:
        """``values`` with this condition's name, which :meth:`_check_state` checks."""
        return {"name": self.name, **values}

    def _check_state(self, state: dict, keys: Sequence[str]) -> None:
        if state.get("name") != self.name:
            raise ConfigError(
                f"cannot load the state of condition {state.get('name')!r} into {self.name!r}"
            )
        missing = [k for k in keys if k not in state]
        if missing:
            raise ConfigError(f"{self.name} state lacks {missing}; got keys {sorted(state)}")


def _check_k(k: int) -> int:
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ConfigError(f"k must be a whole number of steps >= 1, got {k!r}")
    return int(k)


def _extra(name: str, key: str, extra: dict) -> float:
    if key not in extra or extra[key] is None:
        raise ConfigError(
            f"the {name} condition needs update(loss, {key}=...) every step; got extras "
            f"{sorted(extra)}"
        )
    return float(extra[key])


class _Streak(Condition):
    """Motivated while a value has moved the good way for at least k steps in a row."""

    start = math.inf  # the worst previous value, so the first step counts (Algorithm 1)

    def __init__(self, k: int):
        self.k = _check_k(k)
        self.previous = self.start
        self.consecutive = 0

    def _improves(self, value: float, previous: float) -> bool:
        return value < previous

    def _observe(self, value: float) -> bool:
        # NaN never improves, so it ends a streak.
        self.consecutive = self.consecutive + 1 if self._improves(value, self.previous) else 0
        self.previous = value
        return self.consecutive >= self.k

    def state_dict(self) -> dict:
        return self._state(k=self.k, previous=self.previous, consecutive=self.consecutive)

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state, ("k", "previous", "consecutive"))
        self.k = _check_k(state["k"])
        self.previous = float(state["previous"])
        self.consecutive = int(state["consecutive"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(k={self.k})"


class LossDecrease(_Streak):
    """Algorithm 1: motivated once the training loss fell k steps in a row.

    A step improves when its loss is below the previous step's loss (whichever model produced
    either); otherwise the count restarts at 0, so the base model is back on the first step
    that does not improve. Neither the previous loss nor the count is reset between epochs.
    """

    name = "loss_decrease"

    def update(self, loss: float, **extra: float) -> bool:
        return self._observe(float(loss))


class ValLoss(_Streak):
    """Motivated once the loss on one held-out training batch fell k steps in a row.

    The method step computes that loss after each step and passes it as ``val_loss``.
    """

    name = "val_loss"
    needs = frozenset({"val_loss"})

    def update(self, loss: float, **extra: float) -> bool:
        return self._observe(_extra(self.name, "val_loss", extra))


class GradSlope(_Streak):
    """Motivated once the global gradient norm rose k steps in a row (a steepening slope).

    The method step passes the Euclidean norm of all gradients of the step as ``grad_norm``.
    """

    name = "grad_slope"
    needs = frozenset({"grad_norm"})
    start = -math.inf

    def _improves(self, value: float, previous: float) -> bool:
        return value > previous

    def update(self, loss: float, **extra: float) -> bool:
        return self._observe(_extra(self.name, "grad_norm", extra))


class EMA(_Streak):
    """Motivated once an exponential moving average of the loss fell k steps in a row.

    The average smooths mini-batch noise: ``ema = alpha * loss + (1 - alpha) * ema``, started
    at the first loss; it has fallen when it drops by more than ``threshold`` of its previous
    value (0.2% by default, the paper's setting with ``alpha = 0.02``).
    """

    name = "ema"

    def __init__(self, k: int, alpha: float = 0.02, threshold: float = 0.002):
        super().__init__(k)
        if not 0.0 < alpha <= 1.0:
            raise ConfigError(f"alpha must be in (0, 1], got {alpha!r}")
        if not 0.0 <= threshold < 1.0:
            raise ConfigError(f"threshold is a relative drop in [0, 1), got {threshold!r}")
        self.alpha = float(alpha)
        self.threshold = float(threshold)

    def _improves(self, value: float, previous: float) -> bool:
        return value < previous * (1.0 - self.threshold)  # always true after +inf

    def update(self, loss: float, **extra: float) -> bool:
        loss = float(loss)
        ema = (
            loss
            if math.isinf(self.previous)
            else (self.alpha * loss + (1.0 - self.alpha) * self.previous)
        )
        return self._observe(ema)

    @property
    def ema(self) -> float | None:
        """The current average (None before the first step)."""
        return None if math.isinf(self.previous) else self.previous

    def state_dict(self) -> dict:
        return {**super().state_dict(), "alpha": self.alpha, "threshold": self.threshold}

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state, ("alpha", "threshold"))
        super().load_state_dict(state)
        self.alpha, self.threshold = float(state["alpha"]), float(state["threshold"])

    def __repr__(self) -> str:
        return f"EMA(k={self.k}, alpha={self.alpha}, threshold={self.threshold})"


class _RandomSchedule(Condition):
    """Motivated at random steps of each epoch, a number of them chosen per epoch.

    Each epoch starts on the base model, so the first step of an epoch is never motivated;
    the motivated steps are drawn among steps ``1 .. steps_per_epoch - 1``. Give the
    condition its own generator: its state is saved and restored with the condition's.
    """

    def __init__(self, steps_per_epoch: int, generator: torch.Generator):
        if isinstance(steps_per_epoch, bool) or int(steps_per_epoch) != steps_per_epoch:
            raise ConfigError(f"steps_per_epoch must be a whole number, got {steps_per_epoch!r}")
        if steps_per_epoch < 1:
            raise ConfigError(f"steps_per_epoch must be >= 1, got {steps_per_epoch!r}")
        if not isinstance(generator, torch.Generator):
            raise ConfigError(
                f"a random condition needs a torch.Generator, got {type(generator).__name__}"
            )
        self.steps_per_epoch = int(steps_per_epoch)
        self.generator = generator
        self.epoch = 0
        self.step = 0  # steps finished in the current epoch
        self.schedule: list[int] | None = None  # motivated step indices of this epoch

    @abc.abstractmethod
    def _count(self, epoch: int) -> int:
        """How many motivated steps epoch ``epoch`` gets."""

    def _draw(self) -> list[int]:
        count = min(self._count(self.epoch), self.steps_per_epoch - 1)
        if count <= 0:
            return []
        order = torch.randperm(self.steps_per_epoch - 1, generator=self.generator)
        return sorted(int(i) + 1 for i in order[:count])

    def update(self, loss: float, **extra: float) -> bool:
        if self.schedule is None:
            self.schedule = self._draw()
        self.step += 1
        return self.step in self.schedule

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self.step = 0
        self.schedule = None

    def state_dict(self) -> dict:
        return self._state(
            steps_per_epoch=self.steps_per_epoch,
            epoch=self.epoch,
            step=self.step,
            schedule=None if self.schedule is None else list(self.schedule),
            generator=self.generator.get_state(),
        )

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state, ("steps_per_epoch", "epoch", "step", "schedule", "generator"))
        self.steps_per_epoch = int(state["steps_per_epoch"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        schedule = state["schedule"]
        self.schedule = None if schedule is None else [int(i) for i in schedule]
        self.generator.set_state(state["generator"])


class RandomA(_RandomSchedule):
    """Ablation A: each epoch, a random number of motivated steps at random steps.

    Args:
        steps_per_epoch: training steps in one epoch.
        generator: this condition's own random generator.
        max_activations: the count is uniform in ``0 .. max_activations``; by default every
            count an epoch allows (``0 .. steps_per_epoch - 1``).
    """

    name = "random_a"

    def __init__(
        self, steps_per_epoch: int, generator: torch.Generator, max_activations: int | None = None
    ):
        super().__init__(steps_per_epoch, generator)
        if max_activations is None:
            max_activations = self.steps_per_epoch - 1
        if int(max_activations) != max_activations or max_activations < 0:
            raise ConfigError(
                f"max_activations must be a whole number >= 0, got {max_activations!r}"
            )
        self.max_activations = int(max_activations)

    def _count(self, epoch: int) -> int:
        return int(torch.randint(0, self.max_activations + 1, (1,), generator=self.generator))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "max_activations": self.max_activations}

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state, ("max_activations",))
        super().load_state_dict(state)
        self.max_activations = int(state["max_activations"])


class RandomB(_RandomSchedule):
    """Ablation B: as many motivated steps per epoch as earlier runs had, at random steps.

    Args:
        steps_per_epoch: training steps in one epoch.
        generator: this condition's own random generator.
        counts_from: ``metrics.jsonl`` files of earlier runs; per epoch, the mean of their
            ``motivated_steps`` (rounded to the nearest whole step) is used.
        counts: the per-epoch counts directly, instead of ``counts_from``.

    Raises:
        ConfigError: neither or both sources given, a file without ``motivated_steps``, or
            (in ``update``) an epoch past the recorded ones.
    """

    name = "random_b"

    def __init__(
        self,
        steps_per_epoch: int,
        generator: torch.Generator,
        counts_from: Sequence[PathLike] | None = None,
        counts: Sequence[float] | None = None,
    ):
        super().__init__(steps_per_epoch, generator)
        if (counts_from is None) == (counts is None):
            raise ConfigError(
                "RandomB needs exactly one of counts_from=[metrics.jsonl of earlier runs] or "
                f"counts=[motivated steps per epoch]; got counts_from={counts_from!r}, "
                f"counts={counts!r}"
            )
        if counts_from is not None:
            if isinstance(counts_from, (str, Path)):
                counts_from = [counts_from]
            counts = mean_motivated_steps(counts_from)
        if any(c < 0 for c in counts):
            raise ConfigError(f"motivated step counts must be >= 0, got {list(counts)}")
        # Python's round() halves to even; floor(x + 0.5) rounds 2.5 up as people expect.
        self.counts = [int(math.floor(float(c) + 0.5)) for c in counts]

    def _count(self, epoch: int) -> int:
        if epoch >= len(self.counts):
            raise ConfigError(
                f"random_b knows motivated step counts for {len(self.counts)} epochs, but epoch "
                f"{epoch + 1} started; give counts from runs at least as long as this one"
            )
        return self.counts[epoch]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "counts": list(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state, ("counts",))
        super().load_state_dict(state)
        self.counts = [int(c) for c in state["counts"]]


def read_motivated_steps(path: PathLike) -> list[int]:
    """Per epoch, the ``motivated_steps`` of one run's ``metrics.jsonl``.

    Lines without that key are skipped. When lines carry an ``epoch``, they are ordered by it
    and the last line of an epoch wins (a resumed run may log an epoch twice).

    Raises:
        ConfigError: the file is missing, is not JSON lines, or has no line with
            ``motivated_steps``.
    """
    by_epoch: dict[float, int] = {}
    for number, record in enumerate(read_metrics(path)):
        if "motivated_steps" not in record:
            continue
        by_epoch[record.get("epoch", number)] = int(record["motivated_steps"])
    if not by_epoch:
        raise ConfigError(f"{path} has no line with 'motivated_steps'; is it a motivation run?")
    return [by_epoch[e] for e in sorted(by_epoch)]


def mean_motivated_steps(paths: Sequence[PathLike]) -> list[float]:
    """Per epoch, the mean ``motivated_steps`` over runs (over the runs that reached it)."""
    if not paths:
        raise ConfigError("need at least one metrics.jsonl to average motivated steps over")
    runs = [read_motivated_steps(p) for p in paths]
    longest = max(len(r) for r in runs)
    means = []
    for epoch in range(longest):
        values = [r[epoch] for r in runs if epoch < len(r)]
        means.append(sum(values) / len(values))
    return means


CONDITIONS = ("loss_decrease", "ema", "val_loss", "grad_slope", "random_a", "random_b")

_OPTIONS = {
    "loss_decrease": (),
    "ema": ("alpha", "threshold"),
    "val_loss": (),
    "grad_slope": (),
    "random_a": ("max_activations",),
    "random_b": ("counts_from", "counts"),
}


def build_condition(
    name: str, k: int, steps_per_epoch: int, generator: torch.Generator, **opts: object
) -> Condition:
    """Build a motivation condition by name.

    Args:
        name: one of :data:`CONDITIONS`.
        k: steps in a row for the streak conditions (ignored by the random ones).
        steps_per_epoch: training steps per epoch (used by the random ones).
        generator: random generator (used by the random ones; give them their own).
        **opts: the condition's options: ``alpha``, ``threshold`` (ema); ``max_activations``
            (random_a); ``counts_from`` or ``counts`` (random_b).

    Raises:
        ConfigError: an unknown name or an option the condition does not take.
    """
    if name not in _OPTIONS:
        raise ConfigError(f"unknown motivation condition {name!r}: use one of {list(CONDITIONS)}")
    unknown = sorted(set(opts) - set(_OPTIONS[name]))
    if unknown:
        accepted = list(_OPTIONS[name]) or "none"
        raise ConfigError(
            f"condition {name!r} does not take option(s) {unknown}; it accepts {accepted}"
        )
    if name == "loss_decrease":
        return LossDecrease(k)
    if name == "ema":
        return EMA(k, **opts)
    if name == "val_loss":
        return ValLoss(k)
    if name == "grad_slope":
        return GradSlope(k)
    if name == "random_a":
        return RandomA(steps_per_epoch, generator, **opts)
    return RandomB(steps_per_epoch, generator, **opts)
