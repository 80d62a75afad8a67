"""The training run: built from a recipe, then epochs of training, evaluation, logs, checkpoints.

The run is method-agnostic: a method step (``nestedtrain.methods``) runs the forwards and
backwards; :func:`~nestedtrain.engine.loop.train_one_epoch` steps the optimizer, the schedule and
the EMA, and returns when the run asks to save or stop; the trainer saves, evaluates the main
network and a set of sub-networks, and writes the run folder.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from timm.utils import ModelEmaV3

from ..data import build_data
from ..distributed import (
    all_ranks,
    average_bn,
    barrier,
    configure_cuda,
    control_group,
    init_distributed,
)
from ..errors import ConfigError, TrainingInterrupted
from ..methods import Precision
from ..records import METRICS_FILE, append_kl_drift, read_metrics, truncate_logs, write_summary
from ..signals import StopSignals
from .build import (
    MethodParts,
    build_method,
    build_optimizer,
    build_run_model,
    build_scheduler,
)
from .checkpoint import (
    RunState,
    gather_rng_states,
    load_resume_checkpoint,
    restore_run,
    run_checkpoint,
    seed_everything,
)
from .epoch_eval import EpochEvaluation
from .logs import EpochLog
from .loop import MetricLogger, StepControl, check_finite, end_epoch, train_one_epoch
from .resume import check_resume_recipe
from .runfolder import RunFolder
from .summary import run_summary

__all__ = ["Trainer", "train"]

logger = logging.getLogger("nestedtrain")


class Trainer:
    """Everything one training run needs; :meth:`fit` runs it.

    Construction validates the whole setup (model, data, method) before anything is written,
    so a bad recipe leaves no run folder behind.
    """

    def __init__(
        self,
        cfg: DictConfig,
        out_dir: str | Path,
        resume: bool = False,
        allow_changes: bool = False,
    ):
        """``resume`` continues the run in ``out_dir``; its recipe may differ from the run's
        ``config.yaml`` only in fields that do not change the computation, unless
        ``allow_changes`` (see ``nestedtrain.engine.resume``)."""
        self.cfg, self.resume = cfg, resume
        self.folder = RunFolder(out_dir)
        self.out_dir = self.folder.path
        self.folder.check_start(resume)
        self._recipe_changes = (
            check_resume_recipe(self.out_dir, cfg, allow_changes) if resume else None
        )
        self.dist, self.device = init_distributed(cfg.device)
        configure_cuda(self.device)
        seed_everything(cfg.seed)
        self._build(cfg)
        self.run = RunState()
        self.log = EpochLog(self.out_dir)
        # Stop requests and time-based checkpoints are agreed on the host, between steps,
        # so that every rank stops (or saves) after the same step without a device sync.
        self.control = StepControl(cfg.checkpoint, control_group(), self.data.bad_images)
        self.metrics = MetricLogger(epoch=0)  # the epoch being trained, or the last one
        self._last_checkpoint: Path | None = None
        self._wall_start = time.perf_counter()
        # Dropout and drop-path masks come from the global torch (and CUDA) generators: once
        # everything is built alike, each further rank draws its own, from seed + rank. Rank 0
        # goes on from the seed, so a one-process run is what it was.
        if self.dist.rank:
            torch.manual_seed(cfg.seed + self.dist.rank)

    def _build(self, cfg: DictConfig) -> None:
        """Data, model, optimizer, schedule, method, EMA and the sub-networks to evaluate."""
        self.data = build_data(
            cfg.data,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            device=self.device,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        if self.dist.enabled:
            # A rank that meets a bad image goes on; the ranks judge them together between
            # steps (StepControl), so that none stops alone inside a collective.
            self.data.bad_images.defer()
        self.model = build_run_model(cfg, self.data.num_classes, self.data.in_chans, self.device)
        _check_forward(self.model, self.data, cfg)
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.data.steps_per_epoch)
        self.precision = Precision(self.device, cfg.amp, cfg.amp_dtype)
        # One generator for sub-network draws, seeded alike on every rank so all ranks draw
        # the same sub-networks.
        self.generator = torch.Generator().manual_seed(cfg.seed)
        parts = MethodParts(
            cfg=cfg,
            model=self.model,
            optimizer=self.optimizer,
            precision=self.precision,
            generator=self.generator,
            data=self.data,
            device=self.device,
            dist=self.dist,
        )
        self.method = build_method(parts)
        self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay) if cfg.ema else None
        self.evaluation = EpochEvaluation(cfg, self.model, self.method, self.ema, self.data)

    # -------------------------------------------------------------------------------- fit
    def fit(
        self,
        progress: bool | None = None,
        step_hook: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """Train, evaluate and write the run folder; returns the summary (rank 0's).

        Args:
            progress: show a progress bar (default: on a terminal, rank 0).
            step_hook: called as ``step_hook(epoch, step)`` after every training step (step
                counts from 1 within the epoch); tests use it to stop a run anywhere.

        Raises:
            TrainingInterrupted: SIGTERM, SIGUSR1 or SIGINT arrived; a checkpoint to resume
                from was written after the step it arrived in.
            TrainingDiverged: a loss term became non-finite; no checkpoint holds it.
            ConfigError: another live process is writing the run folder.
        """
        if progress is None:
            progress = self.dist.is_main and sys.stderr.isatty()
        try:
            with self.folder.locked(self.dist.is_main), StopSignals() as signals:
                self.control.signals = signals
                return self._fit(progress, step_hook)
        finally:
            self.control.signals = None
            self.log.close()

    def _fit(self, progress: bool, step_hook: Callable[[int, int], None] | None) -> dict:
        self._wall_start = time.perf_counter()
        self._prepare_folder()
        if self.resume:
            self._restore()
        barrier()
        self.control.saved()
        record: dict[str, Any] = {}
        for epoch in range(self.run.start_epoch, self.cfg.epochs):
            record = self._epoch(epoch, progress, step_hook)
            if self.control.stop_requested() and epoch < self.cfg.epochs - 1:
                steps, saved = self.data.steps_per_epoch, self._last_checkpoint
                raise TrainingInterrupted(self.control.signal_name(), epoch, steps, saved)
        if not record and self.dist.is_main:
            # resumed from the final checkpoint: the summary comes from the last log line
            metrics = self.out_dir / METRICS_FILE
            records = read_metrics(metrics) if metrics.exists() else []
            record = records[-1] if records else {}
        summary = self._finish(record)
        barrier()
        return summary

    def _epoch(
        self, epoch: int, progress: bool, step_hook: Callable[[int, int], None] | None
    ) -> dict[str, Any]:
        """Train one epoch, evaluate when due, log it and save the checkpoint."""
        epoch_start = time.perf_counter()
        train_stats = self.train_epoch(epoch, progress, step_hook)
        record = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"]}
        record.update({k: v for k, v in train_stats.items() if k != "train_seconds"})
        record.update(self.method.epoch_metrics())
        is_best = False
        if epoch == self.cfg.epochs - 1 or (epoch + 1) % self.cfg.eval.every == 0:
            record.update(self.evaluate_epoch())
            # under torchrun, every rank's bad images judged alike on every rank (an error
            # on all of them, or none), before the evaluation is logged
            self.data.bad_images.agree(self.control.group)
            is_best = self._track_best(epoch, record)
        self._record_kl_drift(epoch)
        record["epoch_seconds"] = time.perf_counter() - epoch_start
        if self.dist.is_main:
            self.log.write(record)
        self._save(epoch, is_best)
        return record

    def train_epoch(
        self,
        epoch: int,
        progress: bool,
        step_hook: Callable[[int, int], None] | None = None,
    ) -> dict[str, float]:
        """Train epoch ``epoch`` (on from a loaded mid-epoch checkpoint), saving where asked."""
        partial, self.run.partial = self.run.partial, None
        metrics = MetricLogger.from_state(partial, self.device) if partial else MetricLogger(epoch)
        self.metrics = metrics
        batches = iter(self.data.train_batches(epoch, metrics.step))
        while True:
            asked = train_one_epoch(
                self.method,
                batches,
                metrics,
                self.control,
                self.cfg,
                steps=self.data.steps_per_epoch,
                device=self.device,
                scheduler=self.scheduler,
                ema=self.ema,
                model=self.model,
                is_main=self.dist.is_main,
                progress=progress,
                last_checkpoint=self._last_checkpoint,
                step_hook=step_hook,
            )
            if not (asked.stop or asked.save):
                break
            saved = self._save_progress(metrics)
            if asked.stop:
                raise TrainingInterrupted(self.control.signal_name(), epoch, metrics.step, saved)
        self._check_finite()
        return end_epoch(self.method, metrics, self.scheduler, self.device, self.cfg.batch_size)

    def _check_finite(self) -> None:
        check_finite(self.metrics, self.precision, self._last_checkpoint, self.control.group)

    def _track_best(self, epoch: int, record: dict[str, Any]) -> bool:
        """Whether this epoch is the best so far: chosen on the validation split, or the last
        evaluated epoch when none is held out (never on test)."""
        val, best = record.get("val_acc"), self.run.best["val_acc"]
        if val is None or best is None or val > best:
            self.run.best = {"epoch": epoch, "val_acc": val, "test_acc": record["test_acc"]}
            return True
        return False

    def _finish(self, record: dict[str, Any]) -> dict[str, Any]:
        """Rank 0 writes the weights and ``summary.json`` (the mark of a finished run)."""
        if not self.dist.is_main:
            return {}
        wall = self.run.wall_before + time.perf_counter() - self._wall_start
        summary = run_summary(
            self.cfg, self.model, self.method, self.data, record, self.run.best, wall
        )
        models = {**self.method.extra_models(), "weights": self.model}
        with self.evaluation.as_evaluated(models):  # the motivated model's re-estimated BN
            self.folder.save_models(models)
        write_summary(self.out_dir, summary)
        return summary

    # --------------------------------------------------------------------- run folder
    def _prepare_folder(self) -> None:
        if self.dist.is_main:
            facts = {"world_size": self.dist.world_size, "device": str(self.device)}
            self.folder.prepare(self.cfg, self._recipe_changes, facts)

    def _parts(self) -> dict[str, Any]:
        return {
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "num_classes": self.data.num_classes,
            "in_chans": self.data.in_chans,
            "test_img_size": self.data.test_img_size,
            "model": self.model,
            "method": self.method,
            "scheduler": self.scheduler,
            "ema": self.ema,
            "bad_images": self.data.bad_images,
        }

    def _save(self, epoch: int, is_best: bool) -> None:
        """The checkpoint after epoch ``epoch``'s end (and ``best.pt`` when ``is_best``)."""
        self._checkpoint((epoch, 0), None, is_best)

    def _save_progress(self, metrics: MetricLogger) -> Path:
        """A mid-epoch checkpoint: the weights and everything needed to go on from here."""
        return self._checkpoint((metrics.epoch, metrics.step), metrics)

    def _checkpoint(
        self, position: tuple[int, int], progress: MetricLogger | None, best: bool = False
    ) -> Path:
        """A checkpoint after ``position`` = (epoch, steps done): mid-epoch with the epoch's
        ``progress``, else after the epoch's end. Every rank takes part; rank 0 writes."""
        self._check_finite()  # never save a non-finite state
        self.data.bad_images.agree(self.control.group)  # nor one bad images should stop
        self._agree_bn()
        rng = gather_rng_states(self.control.group, self.dist.world_size)
        if self.dist.is_main:
            partial = progress.state_dict() if progress is not None else None
            wall = self.run.wall_before + time.perf_counter() - self._wall_start
            state = run_checkpoint(self._parts(), self.run, position, partial, rng, wall)
            self.folder.save(state, best)
        self._last_checkpoint = self.folder.last
        self.control.saved()
        # Under torchrun an exiting rank ends the others: they wait until the file is whole.
        barrier()
        return self._last_checkpoint

    def _restore(self) -> None:
        # Every rank resumes from the same file: last.pt only if every rank could read it.
        state, path, note = load_resume_checkpoint(
            self.folder.last,
            map_location=self.device,
            agree=lambda ok: all_ranks(ok, self.control.group),
        )
        if note and self.dist.is_main:
            logger.warning(note)
        self.run = restore_run(
            state, self._parts(), self.dist.rank, self.dist.world_size, self.cfg.seed
        )
        self._last_checkpoint = path
        if self.dist.is_main:
            # Drop what was logged after the checkpoint (a kill between a log and a save).
            truncate_logs(self.out_dir, before_epoch=self.run.start_epoch)

    def _agree_bn(self) -> None:
        """The BN statistics of every model the run evaluates or saves, averaged over ranks."""
        ema = [self.ema.module] if self.ema is not None else []
        average_bn([self.model, *self.method.extra_models().values(), *ema], self.dist)

    # --------------------------------------------------------------------- evaluation
    def evaluate_epoch(self) -> dict[str, Any]:
        """The main network on test (and val), the EMA and the method's other models, and the
        chosen sub-networks, BN re-estimated for each (:class:`EpochEvaluation`)."""
        self._agree_bn()
        with self.precision.autocast():  # with amp on CUDA, evaluate in its dtype too
            return self.evaluation.epoch()

    def _record_kl_drift(self, epoch: int) -> None:
        every = self.cfg.analysis.kl_drift_every
        if not every or (epoch + 1) % every:
            return
        with self.precision.autocast():
            snapshot = self.evaluation.kl_drift()
        if self.dist.is_main:
            append_kl_drift(self.out_dir, epoch, snapshot)


def _check_forward(model: torch.nn.Module, data: Any, cfg: DictConfig) -> None:
    """One eval-mode forward of two test images, so that a model that cannot take this data
    fails here, with one line, before any run folder exists."""
    images, _ = next(iter(data.eval_batches("test", batch_size=2)))
    model.eval()
    try:
        with torch.no_grad():
            model(images[:2])
    except (RuntimeError, AssertionError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(
            f"model {cfg.model.name!r} cannot run on {cfg.data.name} images of "
            f"shape {tuple(images.shape[1:])}: {first} (set data.img_size or model.kwargs)"
        ) from None
    finally:
        model.train()


def train(
    cfg: DictConfig, out_dir: str | Path, resume: bool = False, progress: bool | None = None
) -> dict[str, Any]:
    """Run a recipe into ``out_dir``; returns the summary. See :class:`Trainer`."""
    return Trainer(cfg, out_dir, resume=resume).fit(progress=progress)
