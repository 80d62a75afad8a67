"""One training epoch, torchvision-reference style: :func:`train_one_epoch`.

:func:`train_one_epoch` runs a method's steps, the optimizer, the schedule and the EMA over an
epoch's batches until the epoch ends, or until the run's :class:`StepControl` asks, between
two steps, to stop (a signal) or to save (a step or time checkpoint): it returns what was
asked (:class:`Requests`); the caller saves and, to go on, calls it again with the same
batches. :func:`end_epoch` closes the epoch. Nothing in a step waits for the device: the
epoch's :class:`MetricLogger` sums the loss terms as tensors and watches them for non-finite
values on the device, and they are read on the host every ``log_every`` steps, at checkpoints
and at the epoch's end.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from ..data.images import BadImages
from ..distributed import all_reduce_mean, input_memory_format
from ..errors import TrainingDiverged
from ..methods import MethodStep, Precision
from ..signals import StopSignals

__all__ = [
    "MetricLogger",
    "Requests",
    "StepControl",
    "check_finite",
    "end_epoch",
    "sync_lr",
    "train_one_epoch",
]

logger = logging.getLogger("nestedtrain")

# Below this float16 loss scale, GradScaler has skipped so many steps for non-finite
# gradients (halving its scale from 2**16 each time) that training no longer progresses.
_MIN_LOSS_SCALE = 2.0**-8

# Under torchrun the ranks agree on stop requests and time-based checkpoints every this many
# steps of an epoch and at its last step: a host round trip between all ranks every step
# would cost more than a signal waiting a few steps.
_AGREE_EVERY = 20


class Requests(NamedTuple):
    """What the run asked for after a step (every rank alike)."""

    stop: bool  # a stop signal arrived: save, then stop
    save: bool  # a step or time checkpoint is due


def train_one_epoch(
    method: MethodStep,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    metrics: MetricLogger,
    control: StepControl,
    cfg: DictConfig,
    *,
    steps: int,
    device: torch.device,
    scheduler: Any = None,
    ema: Any = None,
    model: nn.Module | None = None,
    is_main: bool = True,
    progress: bool = False,
    last_checkpoint: Path | None = None,
    step_hook: Callable[[int, int], None] | None = None,
) -> Requests:
    """Train epoch ``metrics.epoch`` from step ``metrics.step`` on (``batches``: the rest of
    its batches) until it ends or ``control`` asks after a step to stop or save; returns
    what it asked (neither: the epoch ended). Raises :class:`TrainingDiverged`.

    ``cfg`` gives ``epochs``, ``batch_size``, ``log_every``, ``optim.clip_grad`` and
    ``channels_last``; ``steps``: the steps of a whole epoch; ``ema`` follows ``model``;
    rank 0 (``is_main``) without a ``progress`` bar logs a line every ``log_every`` steps.
    """
    epoch, label = metrics.epoch, f"epoch {metrics.epoch + 1}/{cfg.epochs}"
    bar = tqdm(
        total=steps,
        initial=metrics.step,
        desc=label,
        disable=not progress,
        leave=False,
        file=sys.stderr,
    )
    memory_format = input_memory_format(device, cfg.channels_last)
    method.model.train()
    num_updates = epoch * steps + metrics.step
    asked, start = Requests(stop=False, save=False), time.perf_counter()
    for images, labels in batches:
        if memory_format != torch.contiguous_format:  # the CPU's batches are left as they are
            images = images.contiguous(memory_format=memory_format)
        info = _train_step(method, images, labels, cfg.optim.clip_grad)
        num_updates += 1
        _follow(method, num_updates, scheduler, ema, model)
        metrics.update(info)
        bar.update(1)
        if metrics.step % cfg.log_every == 0:
            check_finite(metrics, method.precision, last_checkpoint, control.group)
            loss = float(info["loss"])
            bar.set_postfix(loss=f"{loss:.3f}")
            if is_main and not progress:
                metrics.log_line(label, steps, cfg.batch_size, loss)
        if step_hook is not None:
            step_hook(epoch, metrics.step)
        asked = control.after_step(num_updates, metrics.step, epoch_done=metrics.step == steps)
        if asked.stop or asked.save:
            break
    bar.close()
    metrics.seconds += time.perf_counter() - start
    return asked


def _train_step(
    method: MethodStep, images: torch.Tensor, labels: torch.Tensor, clip_grad: float | None
) -> dict[str, Any]:
    """One update: the method's step and the optimizer's."""
    info = method.step(images, labels)
    optimizer = method.optimizer
    method.precision.step(optimizer, clip_grad)
    optimizer.zero_grad(set_to_none=True)
    method.after_optimizer_step(info)
    return info


def _follow(
    method: MethodStep, num_updates: int, scheduler: Any, ema: Any, model: nn.Module | None
) -> None:
    """After update ``num_updates``: the schedule's step, and the EMA's."""
    if scheduler is not None:
        scheduler.step_update(num_updates)
        sync_lr(method.optimizers)
    if ema is not None:
        ema.update(model, step=num_updates)


def end_epoch(
    method: MethodStep,
    metrics: MetricLogger,
    scheduler: Any,
    device: torch.device,
    batch_size: int,
) -> dict[str, float]:
    """After an epoch's last step: the schedule's epoch step and the method's epoch end; the
    epoch's mean loss terms (over ranks), its training seconds and images per second
    (``batch_size``: the global batch)."""
    if scheduler is not None:
        scheduler.step(metrics.epoch + 1)
        sync_lr(method.optimizers)
    method.on_epoch_end(metrics.epoch)
    means = all_reduce_mean(metrics.means(), device)
    return {
        **means,
        "train_seconds": metrics.seconds,
        "images_per_second": metrics.step * batch_size / max(metrics.seconds, 1e-9),
    }


def sync_lr(optimizers: list[torch.optim.Optimizer]) -> None:
    """The schedule drives the first optimizer; the others follow it group by group."""
    lead, *others = optimizers
    for optimizer in others:
        for group, lead_group in zip(optimizer.param_groups, lead.param_groups):
            group["lr"] = lead_group["lr"]


class StepControl:
    """Between steps: whether a stop signal arrived, and whether a checkpoint is due.

    Step checkpoints (``checkpoint.every_steps``) fall on the same steps on every rank. A signal
    or the clock (``checkpoint.every_minutes``) reaches ranks at different steps: under
    torchrun they agree on those every :data:`_AGREE_EVERY` steps and at the epoch's last one
    (one all-reduce on the host ``group``), so a stop takes effect there, on every rank. The
    same all-reduce says whether a rank holds bad-image reports (``bad_images``, deferred):
    then every rank judges those of all ranks, and they stop together if they must.
    """

    def __init__(
        self, checkpoint: DictConfig, group: Any = None, bad_images: BadImages | None = None
    ):
        self.every = checkpoint
        self.group = group  # the gloo control group under torchrun, else None
        self.bad_images = bad_images
        self.signals: StopSignals | None = None  # set while a fit runs
        self.last_save = time.monotonic()

    def after_step(self, num_updates: int, step: int, epoch_done: bool) -> Requests:
        """What is asked after step ``step`` of the epoch (global step ``num_updates``); the
        epoch's last step (``epoch_done``) saves at the epoch's end anyway."""
        every = self.every
        due = bool(every.every_steps) and num_updates % every.every_steps == 0
        if self.group is not None and not (epoch_done or step % _AGREE_EVERY == 0):
            return Requests(stop=False, save=due)
        stop = self.signals is not None and self.signals.requested is not None
        minutes = (time.monotonic() - self.last_save) / 60.0
        timed = bool(every.every_minutes) and minutes >= every.every_minutes
        if self.group is not None:
            held = self.bad_images.held if self.bad_images is not None else 0
            flags = torch.tensor([int(stop), int(timed), held])
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=self.group)
            stop, timed = bool(flags[0]), bool(flags[1])
            if flags[2]:  # raises BadImageError on every rank alike, if it must
                self.bad_images.agree(self.group, anywhere=True)
        return Requests(stop=stop, save=(due or timed) and not epoch_done)

    def stop_requested(self) -> bool:
        """Between epochs: whether a stop signal arrived (under torchrun, on any rank: the
        ranks agree, as at an epoch's last step)."""
        return self.after_step(num_updates=0, step=0, epoch_done=True).stop

    def signal_name(self) -> str:
        requested = self.signals.requested if self.signals is not None else None
        return requested or "a stop signal to another rank"

    def saved(self) -> None:
        self.last_save = time.monotonic()


def check_finite(
    metrics: MetricLogger, precision: Precision, last_checkpoint: Path | None, group: Any = None
) -> None:
    """Raise :class:`TrainingDiverged` if a loss term was non-finite since the last check
    (one host sync), or if float16's loss scale collapsed.

    Under torchrun (``group``: the host control group) every rank calls this at the same
    step and each sees only its own loss: the ranks agree (one all-reduce, and a gather when
    one has diverged), so that all raise the same error, naming the earliest bad step of any
    rank, instead of one rank leaving the others in the next gradient all-reduce.
    """
    bad = metrics.first_bad()
    scaler = precision.scaler
    if bad is None and scaler is not None and scaler.get_scale() < _MIN_LOSS_SCALE:
        term = f"gradients (float16 loss scale fell to {scaler.get_scale():.2g})"
        bad = (metrics.epoch, metrics.step, term, math.inf)
    if group is not None:
        bad = _earliest_on_any_rank(bad, group)
    if bad is not None:
        epoch, step, term, value = bad
        raise TrainingDiverged(epoch, step, term, value, last_checkpoint)


def _earliest_on_any_rank(bad: tuple | None, group: Any) -> tuple | None:
    """The earliest ``(epoch, step, term, value)`` of all ranks' ``bad`` (None: finite)."""
    flag = torch.tensor([int(bad is not None)])
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
    if not flag.item():
        return None
    every: list[Any] = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(every, bad, group=group)
    return min((b for b in every if b is not None), key=lambda b: (b[0], b[1]))


class MetricLogger:
    """One epoch's numbers as it trains: its loss terms summed on the device, the first step
    whose terms were not all finite (watched on the device: a few tiny kernels a step, no
    wait), and a log line when asked. A mid-epoch checkpoint holds its :meth:`state_dict`.

    Attributes:
        epoch: the epoch (0-based).
        step: steps done in this epoch.
        sums: loss terms, summed on the device.
        host_sums: numbers a method gives as such, summed.
        seconds: training time spent on this epoch so far.
    """

    def __init__(
        self,
        epoch: int,
        step: int = 0,
        sums: dict[str, torch.Tensor] | None = None,
        host_sums: dict[str, float] | None = None,
        seconds: float = 0.0,
    ):
        self.epoch, self.step, self.seconds = epoch, step, seconds
        self.sums = sums if sums is not None else {}
        self.host_sums = host_sums if host_sums is not None else {}
        self._keys: list[str] = []  # the watched terms, the total last
        self._bad_at: torch.Tensor | None = None  # (epoch, step) of the first bad step, or -1s
        self._bad_values: torch.Tensor | None = None  # its loss terms
        self._since = (time.perf_counter(), step)  # the last log line: time, step

    def update(self, info: dict[str, Any]) -> None:
        """Count a step and its numbers (``info``: what the method's step returned)."""
        self.step += 1
        for key, value in info.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().double()
                self.sums[key] = self.sums[key] + value if key in self.sums else value
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                self.host_sums[key] = self.host_sums.get(key, 0.0) + float(value)
        self._watch(info)

    def _watch(self, info: dict[str, Any]) -> None:
        # the total last, so that the term that went bad is named rather than the sum
        keys = sorted((k for k, v in info.items() if isinstance(v, torch.Tensor)), key=_term_order)
        if not keys:
            return
        values = torch.stack([info[k].detach().float().reshape(()) for k in keys])
        if self._bad_at is None or keys != self._keys:
            self._keys = keys
            self._bad_at = torch.full((2,), -1, dtype=torch.long, device=values.device)
            self._bad_values = torch.zeros_like(values)
        new = (self._bad_at[0] < 0) & ~torch.isfinite(values).all()
        # Python scalars go to the kernels as arguments: no host-to-device copy.
        epoch, step = self.epoch, self.step
        self._bad_at = torch.stack(
            [torch.where(new, epoch, self._bad_at[0]), torch.where(new, step, self._bad_at[1])]
        )
        self._bad_values = torch.where(new, values, self._bad_values)

    def first_bad(self) -> tuple[int, int, str, float] | None:
        """``(epoch, step, term, value)`` of the first non-finite step, or None (one host
        sync)."""
        if self._bad_at is None:
            return None
        epoch, step = self._bad_at.tolist()
        if epoch < 0:
            return None
        values = self._bad_values.tolist()
        index = next(i for i, v in enumerate(values) if not math.isfinite(v))
        return epoch, step, self._keys[index], values[index]

    def log_line(self, label: str, steps: int, batch_size: int, loss: float) -> None:
        """Log the step, its loss and the images per second since the last line."""
        now = time.perf_counter()
        rate = (self.step - self._since[1]) * batch_size / max(now - self._since[0], 1e-9)
        self._since = (now, self.step)
        logger.info(f"{label} step {self.step}/{steps} loss {loss:.4f} {rate:.1f} images/s")

    def means(self) -> dict[str, float]:
        """The epoch's mean numbers so far (one host sync)."""
        steps = max(self.step, 1)
        keys = sorted(self.sums)
        values = torch.stack([self.sums[k] for k in keys]).tolist() if keys else []
        means = {k: v / steps for k, v in zip(keys, values)}
        means.update({k: v / steps for k, v in self.host_sums.items()})
        return means

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "sums": {k: v.cpu() for k, v in self.sums.items()},
            "host_sums": dict(self.host_sums),
            "seconds": self.seconds,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> MetricLogger:
        return cls(
            state["epoch"],
            state["step"],
            {k: v.to(device) for k, v in state["sums"].items()},
            dict(state["host_sums"]),
            float(state["seconds"]),
        )


def _term_order(key: str) -> tuple[bool, str]:
    return (key == "loss", key)
