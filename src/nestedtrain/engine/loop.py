"""One training epoch, torchvision-reference style: :func:`train_one_epoch`.

The loop runs a method's steps, the optimizer and the schedule, and between steps asks
:class:`StepControl` whether to stop (a signal) or save (a step or time checkpoint). Nothing in a
step waits for the device: loss terms are summed as tensors (:class:`EpochProgress`), watched
for non-finite values on the device (:class:`FiniteWatch`), and read on the host every
``log_every`` steps, at checkpoints and at the epoch's end.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from ..data.images import BadImages
from ..distributed import all_reduce_mean, input_memory_format
from ..errors import TrainingDiverged, TrainingInterrupted
from ..methods import MethodStep, Precision
from ..signals import StopSignals

__all__ = [
    "EpochLoop",
    "EpochProgress",
    "FiniteWatch",
    "StepControl",
    "check_finite",
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


@dataclass
class EpochLoop:
    """What :func:`train_one_epoch` runs, set up once by the trainer.

    Attributes:
        method: the training method's step object.
        batches: ``batches(epoch, first_step)``, the epoch's training batches from a step on.
        steps_per_epoch: steps in a whole epoch.
        precision: autocast and GradScaler.
        scheduler: timm scheduler, stepped per update and per epoch (or None).
        ema: timm ``ModelEmaV3`` of ``model`` (or None).
        model: the main model (what the EMA follows).
        cfg: the recipe (epochs, batch_size, log_every, optim.clip_grad, channels_last).
        device: where training runs.
        is_main: rank 0 (logs lines).
        watch: the run's non-finite watch.
        control: the run's stop/save control.
        check_finite: raises :class:`TrainingDiverged` (reads the watch).
        save_progress: writes a mid-epoch checkpoint of an :class:`EpochProgress`; returns
            its path (None on ranks that do not write).
    """

    method: MethodStep
    batches: Callable[[int, int], Iterable[tuple[torch.Tensor, torch.Tensor]]]
    steps_per_epoch: int
    precision: Precision
    scheduler: Any
    ema: Any
    model: torch.nn.Module
    cfg: DictConfig
    device: torch.device
    is_main: bool
    watch: FiniteWatch
    control: StepControl
    check_finite: Callable[[], None]
    save_progress: Callable[[EpochProgress], Path | None]


def train_one_epoch(
    loop: EpochLoop,
    state: EpochProgress,
    progress: bool,
    step_hook: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Train ``state.epoch`` from step ``state.step`` on; the epoch's mean loss terms (over
    ranks), its training seconds and images per second.

    Raises:
        TrainingInterrupted: a stop signal, after a checkpoint of the step it stopped at.
        TrainingDiverged: a loss term became non-finite.
    """
    cfg, epoch, steps = loop.cfg, state.epoch, loop.steps_per_epoch
    loop.method.model.train()
    num_updates = epoch * steps + state.step
    label = f"epoch {epoch + 1}/{cfg.epochs}"
    bar = tqdm(
        total=steps,
        initial=state.step,
        desc=label,
        disable=not progress,
        leave=False,
        file=sys.stderr,
    )
    step_log = StepLog(not progress and loop.is_main, label, steps, cfg.batch_size, state.step)
    start = time.perf_counter()
    for images, labels in loop.batches(epoch, state.step):
        info = _train_step(loop, images, labels, num_updates)
        num_updates += 1
        state.step += 1
        state.add(info)
        loop.watch.observe(epoch, state.step, info)
        bar.update(1)
        if state.step % cfg.log_every == 0:
            loop.check_finite()
            loss = float(info["loss"])
            bar.set_postfix(loss=f"{loss:.3f}")
            step_log.line(state.step, loss)
        if step_hook is not None:
            step_hook(epoch, state.step)
        stop, due = loop.control.flags(num_updates, state.step, state.step == steps)
        if stop or due:
            now = time.perf_counter()
            state.seconds, start = state.seconds + now - start, now
            saved = loop.save_progress(state)
            if stop:
                bar.close()
                raise TrainingInterrupted(loop.control.signal_name(), epoch, state.step, saved)
    bar.close()
    state.seconds += time.perf_counter() - start
    return _end_epoch(loop, state)


def _train_step(
    loop: EpochLoop, images: torch.Tensor, labels: torch.Tensor, num_updates: int
) -> dict[str, Any]:
    """One update: the method's step, the optimizer, the schedule and the EMA."""
    memory_format = input_memory_format(loop.device, loop.cfg.channels_last)
    if memory_format != torch.contiguous_format:  # the CPU's batches are left as they are
        images = images.contiguous(memory_format=memory_format)
    info = loop.method.step(images, labels)
    optimizer = loop.method.optimizer
    loop.precision.step(optimizer, loop.cfg.optim.clip_grad)
    optimizer.zero_grad(set_to_none=True)
    loop.method.after_optimizer_step(info)
    if loop.scheduler is not None:
        loop.scheduler.step_update(num_updates + 1)
        sync_lr(loop.method.optimizers)
    if loop.ema is not None:
        loop.ema.update(loop.model, step=num_updates + 1)
    return info


def _end_epoch(loop: EpochLoop, state: EpochProgress) -> dict[str, float]:
    loop.check_finite()
    if loop.scheduler is not None:
        loop.scheduler.step(state.epoch + 1)
        sync_lr(loop.method.optimizers)
    loop.method.on_epoch_end(state.epoch)
    means = all_reduce_mean(state.means(), loop.device)
    images_seen = loop.steps_per_epoch * loop.cfg.batch_size
    return {
        **means,
        "train_seconds": state.seconds,
        "images_per_second": images_seen / max(state.seconds, 1e-9),
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

    def flags(self, num_updates: int, step: int, epoch_done: bool) -> tuple[bool, bool]:
        """``(stop, save)`` after step ``step`` of the epoch (global step ``num_updates``);
        the epoch's last step saves at the epoch's end anyway."""
        every = self.every
        due = bool(every.every_steps) and num_updates % every.every_steps == 0
        if self.group is not None and not (epoch_done or step % _AGREE_EVERY == 0):
            return False, due
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
        return stop, (due or timed) and not epoch_done

    def signal_name(self) -> str:
        requested = self.signals.requested if self.signals is not None else None
        return requested or "a stop signal to another rank"

    def saved(self) -> None:
        self.last_save = time.monotonic()


def check_finite(
    watch: FiniteWatch, precision: Precision, last_checkpoint: Path | None, group: Any = None
) -> None:
    """Raise :class:`TrainingDiverged` if a loss term was non-finite since the last check
    (one host sync), or if float16's loss scale collapsed.

    Under torchrun (``group``: the host control group) every rank calls this at the same
    step and each sees only its own loss: the ranks agree (one all-reduce, and a gather when
    one has diverged), so that all raise the same error, naming the earliest bad step of any
    rank, instead of one rank leaving the others in the next gradient all-reduce.
    """
    bad = watch.first_bad()
    scaler = precision.scaler
    if bad is None and scaler is not None and scaler.get_scale() < _MIN_LOSS_SCALE:
        term = f"gradients (float16 loss scale fell to {scaler.get_scale():.2g})"
        bad = (*watch.last, term, math.inf)
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


@dataclass
class EpochProgress:
    """What an epoch has accumulated so far; a mid-epoch checkpoint holds it."""

    epoch: int
    step: int = 0  # steps done in this epoch
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # loss terms, on the device
    host_sums: dict[str, float] = field(default_factory=dict)  # numbers a method gives as such
    seconds: float = 0.0  # training time spent on this epoch so far

    def add(self, info: dict[str, Any]) -> None:
        for key, value in info.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().double()
                self.sums[key] = self.sums[key] + value if key in self.sums else value
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                self.host_sums[key] = self.host_sums.get(key, 0.0) + float(value)

    def means(self) -> dict[str, float]:
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
    def from_state(cls, state: dict[str, Any], device: torch.device) -> EpochProgress:
        return cls(
            state["epoch"],
            state["step"],
            {k: v.to(device) for k, v in state["sums"].items()},
            dict(state["host_sums"]),
            float(state["seconds"]),
        )


class FiniteWatch:
    """Remembers, on the device, the first step whose loss terms were not all finite.

    ``observe`` launches a few tiny kernels and never waits; ``first_bad`` reads the result
    (one host sync), so the loop calls it only every ``log_every`` steps and before saving.
    """

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.where: torch.Tensor | None = None  # (epoch, step) of the first bad step, or -1s
        self.values: torch.Tensor | None = None  # its loss terms
        self.last = (0, 0)  # (epoch, step) last observed

    def observe(self, epoch: int, step: int, info: dict[str, Any]) -> None:
        self.last = (epoch, step)
        # the total last, so that the term that went bad is named rather than the sum
        keys = sorted((k for k, v in info.items() if isinstance(v, torch.Tensor)), key=_term_order)
        if not keys:
            return
        values = torch.stack([info[k].detach().float().reshape(()) for k in keys])
        if self.where is None or keys != self.keys:
            self.keys = keys
            self.where = torch.full((2,), -1, dtype=torch.long, device=values.device)
            self.values = torch.zeros_like(values)
        new = (self.where[0] < 0) & ~torch.isfinite(values).all()
        # Python scalars go to the kernels as arguments: no host-to-device copy.
        self.where = torch.stack(
            [torch.where(new, epoch, self.where[0]), torch.where(new, step, self.where[1])]
        )
        self.values = torch.where(new, values, self.values)

    def first_bad(self) -> tuple[int, int, str, float] | None:
        """``(epoch, step, term, value)`` of the first non-finite step, or None."""
        if self.where is None:
            return None
        epoch, step = self.where.tolist()
        if epoch < 0:
            return None
        values = self.values.tolist()
        index = next(i for i, v in enumerate(values) if not math.isfinite(v))
        return epoch, step, self.keys[index], values[index]


def _term_order(key: str) -> tuple[bool, str]:
    return (key == "loss", key)


class StepLog:
    """Without a progress bar (a batch job's log), rank 0 logs a line every ``log_every``
    steps: the epoch, the step, its loss and the images per second since the last line."""

    def __init__(self, on: bool, epoch: str, steps: int, batch_size: int, step: int):
        self.on, self.epoch, self.steps, self.batch_size = on, epoch, steps, batch_size
        self.since = (time.perf_counter(), step)  # the last log point: time, step

    def line(self, step: int, loss: float) -> None:
        if not self.on:
            return
        now = time.perf_counter()
        rate = (step - self.since[1]) * self.batch_size / max(now - self.since[0], 1e-9)
        self.since = (now, step)
        logger.info(f"{self.epoch} step {step}/{self.steps} loss {loss:.4f} {rate:.1f} images/s")
