"""The training loop: one method step per batch, then evaluation, logs and checkpoints.

The loop is method-agnostic: a method step (``nestedtrain.methods``) runs the forwards and
backwards; the loop steps the optimizer, the schedule and the EMA, evaluates the main network
and a set of sub-networks each epoch, and writes the run folder.
"""

from __future__ import annotations

import json
import logging
import math
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from omegaconf import DictConfig, OmegaConf
from timm.utils import ModelEmaV3, distribute_bn, unwrap_model
from tqdm import tqdm

from .. import __version__, bn
from ..data import Data, build_data
from ..errors import ConfigError
from ..methods import Precision
from ..modes import kept_modes
from ..runlog import METRICS_FILE, read_metrics
from .build import build_method, build_optimizer, build_run_model, build_scheduler, method_spec
from .checkpoint import (
    CHECKPOINT_FORMAT,
    atomic_append_line,
    atomic_save,
    atomic_write_text,
    load_resume_checkpoint,
    previous_path,
    save_checkpoint,
)
from .config import to_yaml
from .distributed import (
    all_ranks,
    all_reduce_mean,
    barrier,
    configure_cuda,
    control_group,
    init_distributed,
    wrap_ddp,
)
from .evaluate import evaluate, select_subnets
from .faults import RunLock, StopSignals, TrainingDiverged, TrainingInterrupted
from .resume import check_resume_recipe
from .subnet_eval import append_kl_drift, evaluate_subnets_shared, kl_drift_snapshot

__all__ = ["Trainer", "train"]

logger = logging.getLogger("nestedtrain")

# Below this float16 loss scale, GradScaler has skipped so many steps for non-finite
# gradients (halving its scale from 2**16 each time) that training no longer progresses.
_MIN_LOSS_SCALE = 2.0**-8

# Under torchrun the ranks agree on stop requests and time-based checkpoints every this many
# steps of an epoch and at its last step: a host round trip between all ranks every step
# would cost more than a signal waiting a few steps.
_AGREE_EVERY = 20


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.resume = resume
        last = self.out_dir / "checkpoints" / "last.pt"
        if resume and not (last.is_file() or previous_path(last).is_file()):
            raise ConfigError(
                f"--resume: {str(self.out_dir)!r} has no checkpoints/last.pt to resume from"
            )
        if not resume and _holds_a_run(self.out_dir):
            raise ConfigError(
                f"run folder {str(self.out_dir)!r} already holds a run: pass --resume to continue "
                "it, or choose another --out"
            )
        self._recipe_changes = (
            check_resume_recipe(self.out_dir, cfg, allow_changes) if resume else None
        )
        self.dist, self.device = init_distributed(cfg.device)
        configure_cuda(self.device)
        # Stop requests and time-based checkpoints are agreed on the host, between steps,
        # so that every rank stops (or saves) after the same step without a device sync.
        self._control = control_group()
        _seed_everything(cfg.seed)
        self.data: Data = build_data(
            cfg.data,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            device=self.device,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.model = build_run_model(cfg, self.data.num_classes, self.data.in_chans, self.device)
        self._check_forward()
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.data.steps_per_epoch)
        self.precision = Precision(self.device, cfg.amp, cfg.amp_dtype)
        # One generator for sub-network draws, seeded alike on every rank so all ranks draw
        # the same sub-networks.
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.wrapped = wrap_ddp(
            self.model,
            self.dist,
            self.device,
            find_unused_parameters=method_spec(cfg.method).samples_subnets,
        )
        self.method = build_method(self)
        self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay) if cfg.ema else None
        self.eval_subnets = select_subnets(self.model, cfg.eval.subnets, seed=cfg.seed)
        self.kl_drift_subnets = (
            select_subnets(self.model, cfg.analysis.kl_drift_subnets, seed=cfg.seed)
            if cfg.analysis.kl_drift_every
            else []
        )
        self.start_epoch = 0
        self.best: dict[str, Any] = {"epoch": None, "val_acc": None}
        self.writer = None
        self.progress_state: _EpochProgress | None = None  # a mid-epoch checkpoint's
        self.wall_before = 0.0  # seconds of the run before this process (resumed runs)
        self._signals: StopSignals | None = None
        self._watch = _FiniteWatch()
        self._last_save = time.monotonic()
        self._last_checkpoint: Path | None = None
        self._wall_start = time.perf_counter()
        # Dropout and drop-path masks come from the global torch (and CUDA) generators: once
        # everything is built alike, each further rank draws its own, from seed + rank. Rank 0
        # goes on from the seed, so a one-process run is what it was.
        if self.dist.rank:
            torch.manual_seed(cfg.seed + self.dist.rank)

    # ------------------------------------------------------------------------------ setup
    def _check_forward(self) -> None:
        """One eval-mode forward of two test images, so that a model that cannot take this
        data fails here, with one line, before any run folder exists."""
        images, _ = next(iter(self.data.eval_batches("test", batch_size=2)))
        self.model.eval()
        try:
            with torch.no_grad():
                self.model(images[:2])
        except (RuntimeError, AssertionError, ValueError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError(
                f"model {self.cfg.model.name!r} cannot run on {self.cfg.data.name} images of "
                f"shape {tuple(images.shape[1:])}: {first} (set data.img_size or model.kwargs)"
            ) from None
        finally:
            self.model.train()

    # --------------------------------------------------------------------------- run folder
    def _prepare_folder(self) -> None:
        if not self.dist.is_main:
            return
        (self.out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        if self.resume:
            if self._recipe_changes:
                logger.warning(self._recipe_changes.describe())
                self._recipe_changes.record(self.out_dir, self.cfg)
            return
        # A start stopped before its first checkpoint may have left logs: start them afresh.
        for name in (METRICS_FILE, "analysis/kl_drift.jsonl"):
            _truncate_log(self.out_dir / name, before_epoch=0)
        meta = {
            "nestedtrain": __version__,
            "torch": str(torch.__version__),
            "timm": timm.__version__,
            "git_commit": _git_commit(),
            "world_size": self.dist.world_size,
            "device": str(self.device),
        }
        # The run's facts go in comments so that config.yaml stays a valid recipe to rerun.
        header = "".join(f"# {key}: {value}\n" for key, value in meta.items())
        text = header + to_yaml(self.cfg)
        atomic_write_text(self.out_dir / "config.yaml", text)

    def _checkpoint_state(
        self,
        position: tuple[int, int],
        partial: _EpochProgress | None,
        rng: list[dict[str, Any]],
    ) -> dict[str, Any]:
        """Everything to continue exactly after ``position`` = (epoch, steps done in it):
        at the next epoch's start when ``partial`` is None (the epoch's end is done), else
        within the epoch. ``rng``: every rank's RNG state (:meth:`_rng_states`)."""
        epoch, step = position
        if partial is None:
            resume_at = {"epoch": epoch + 1, "step": 0}
        else:
            resume_at = {"epoch": epoch, "step": step}
        return {
            "format": CHECKPOINT_FORMAT,
            # the last epoch whose end (evaluation, log line) is done
            "epoch": epoch if partial is None else epoch - 1,
            "position": resume_at,
            "partial": partial.state_dict() if partial is not None else None,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "num_classes": self.data.num_classes,
            "in_chans": self.data.in_chans,
            "test_img_size": self.data.test_img_size,
            "model": self.model.state_dict(),
            "method": self.method.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": rng[0],
            # under torchrun, each rank's: its dropout masks go on from where they were
            "rng_ranks": rng if len(rng) > 1 else None,
            "best": dict(self.best),
            "bad_images": self.data.bad_images.state_dict(),
            "wall_seconds": self.wall_before + time.perf_counter() - self._wall_start,
            "versions": {"nestedtrain": __version__, "torch": torch.__version__},
        }

    def _rng_states(self) -> list[dict[str, Any]]:
        """Every rank's RNG state, in rank order (gathered on the control group)."""
        mine = _rng_state()
        if self._control is None:
            return [mine]
        states: list[Any] = [None] * self.dist.world_size
        torch.distributed.all_gather_object(states, mine, group=self._control)
        return states

    def _restore(self) -> None:
        # Every rank resumes from the same file: last.pt only if every rank could read it.
        state, path, note = load_resume_checkpoint(
            self.out_dir / "checkpoints" / "last.pt",
            map_location=self.device,
            agree=lambda ok: all_ranks(ok, self._control),
        )
        if note and self.dist.is_main:
            logger.warning(note)
        self.model.load_state_dict(state["model"])
        self.method.load_state_dict(state["method"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        ranks = state.get("rng_ranks")
        if ranks is not None and len(ranks) == self.dist.world_size:
            _set_rng_state(ranks[self.dist.rank])
        else:
            _set_rng_state(state["rng"])
            if self.dist.rank:  # another number of ranks than the checkpoint's
                torch.manual_seed(self.cfg.seed + self.dist.rank)
        self.best = state["best"]
        if "bad_images" in state:
            self.data.bad_images.load_state_dict(state["bad_images"])
        self.wall_before = float(state.get("wall_seconds", 0.0))
        # checkpoints from before step checkpoints hold only the finished epoch
        position = state.get("position") or {"epoch": state["epoch"] + 1, "step": 0}
        self.start_epoch = position["epoch"]
        if state.get("partial") is not None:
            self.progress_state = _EpochProgress.from_state(state["partial"], self.device)
        self._last_checkpoint = path
        if self.dist.is_main:
            # Drop what was logged after the checkpoint (a kill between a log and a save).
            for name in (METRICS_FILE, "analysis/kl_drift.jsonl"):
                _truncate_log(self.out_dir / name, before_epoch=self.start_epoch)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        atomic_append_line(self.out_dir / METRICS_FILE, json.dumps(record))
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run drops the events logged after its checkpoint.
            self.writer = SummaryWriter(
                str(self.out_dir / "tensorboard"), purge_step=record["epoch"]
            )
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "epoch" and value is not None:
                self.writer.add_scalar(key, value, record["epoch"])
        if record.get("subnets"):
            accs = [s["acc"] for s in record["subnets"]]
            self.writer.add_scalar("subnet_acc_mean", sum(accs) / len(accs), record["epoch"])
            self.writer.add_scalar("subnet_acc_min", min(accs), record["epoch"])
        self.writer.flush()

    # ----------------------------------------------------------------------------- epochs
    def train_epoch(
        self,
        epoch: int,
        progress: bool,
        step_hook: Callable[[int, int], None] | None = None,
    ) -> dict[str, float]:
        """Train epoch ``epoch`` (from a mid-epoch checkpoint's step on, if one is loaded).

        Nothing in a step waits for the device: loss terms are summed as tensors and read on
        the host every ``log_every`` steps, at checkpoints and at the epoch's end.
        """
        state = self.progress_state or _EpochProgress(epoch)
        self.progress_state = None
        model = self.method.model
        model.train()
        steps_per_epoch = self.data.steps_per_epoch
        log_every = self.cfg.log_every
        num_updates = epoch * steps_per_epoch + state.step
        bar = tqdm(
            total=steps_per_epoch,
            initial=state.step,
            desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
            disable=not progress,
            leave=False,
            file=sys.stderr,
        )
        start = time.perf_counter()
        step_log = _StepLog(
            not progress and self.dist.is_main,
            f"epoch {epoch + 1}/{self.cfg.epochs}",
            steps_per_epoch,
            self.cfg.batch_size,
            state.step,
        )
        for images, labels in self.data.train_batches(epoch, state.step):
            if self.device.type == "cuda" and self.cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            info = self.method.step(images, labels)
            optimizer = self.method.optimizer
            self.precision.step(optimizer, self.cfg.optim.clip_grad)
            optimizer.zero_grad(set_to_none=True)
            self.method.after_optimizer_step(info)
            num_updates += 1
            if self.scheduler is not None:
                self.scheduler.step_update(num_updates)
                self._sync_lr()
            if self.ema is not None:
                self.ema.update(self.model, step=num_updates)
            state.step += 1
            state.add(info)
            self._watch.observe(epoch, state.step, info)
            bar.update(1)
            if state.step % log_every == 0:
                self._check_finite()
                loss = float(info["loss"])
                bar.set_postfix(loss=f"{loss:.3f}")
                step_log.line(state.step, loss)
            if step_hook is not None:
                step_hook(epoch, state.step)
            stop, due = self._control_flags(num_updates, state.step, state.step == steps_per_epoch)
            if stop or due:
                now = time.perf_counter()
                state.seconds += now - start
                start = now
                self._save_progress(state)
                if stop:
                    bar.close()
                    raise TrainingInterrupted(
                        self._signal_name(), epoch, state.step, self._last_checkpoint
                    )
        bar.close()
        state.seconds += time.perf_counter() - start
        self._check_finite()
        if self.scheduler is not None:
            self.scheduler.step(epoch + 1)
            self._sync_lr()
        self.method.on_epoch_end(epoch)
        means = all_reduce_mean(state.means(), self.device)
        images_seen = steps_per_epoch * self.cfg.batch_size
        return {
            **means,
            "train_seconds": state.seconds,
            "images_per_second": images_seen / max(state.seconds, 1e-9),
        }

    def _control_flags(self, num_updates: int, step: int, epoch_done: bool) -> tuple[bool, bool]:
        """Whether to stop (a signal), and whether a mid-epoch checkpoint is due, after step
        ``step`` of the epoch (global step ``num_updates``). The epoch's last step saves at
        the epoch's end anyway.

        Step checkpoints fall on the same steps on every rank. A signal or the clock reaches
        ranks at different steps: under torchrun they agree on those every
        :data:`_AGREE_EVERY` steps and at the epoch's last one (one gloo all-reduce), so a
        stop request takes effect there, on every rank.
        """
        every = self.cfg.checkpoint
        due = bool(every.every_steps) and num_updates % every.every_steps == 0
        if self._control is not None and not (epoch_done or step % _AGREE_EVERY == 0):
            return False, due
        stop = self._signals is not None and self._signals.requested is not None
        minutes = (time.monotonic() - self._last_save) / 60.0
        timed = bool(every.every_minutes) and minutes >= every.every_minutes
        if self._control is not None:
            flags = torch.tensor([int(stop), int(timed)])
            torch.distributed.all_reduce(
                flags, op=torch.distributed.ReduceOp.MAX, group=self._control
            )
            stop, timed = bool(flags[0]), bool(flags[1])
        return stop, (due or timed) and not epoch_done

    def _signal_name(self) -> str:
        requested = self._signals.requested if self._signals is not None else None
        return requested or "a stop signal to another rank"

    def _check_finite(self) -> None:
        """Raise :class:`TrainingDiverged` if a loss term was non-finite since the last check
        (one host sync), or if float16's loss scale collapsed."""
        bad = self._watch.first_bad()
        if bad is not None:
            epoch, step, term, value = bad
            raise TrainingDiverged(epoch, step, term, value, self._last_checkpoint)
        scaler = self.precision.scaler
        if scaler is not None and scaler.get_scale() < _MIN_LOSS_SCALE:
            epoch, step = self._watch.last
            raise TrainingDiverged(
                epoch,
                step,
                f"gradients (float16 loss scale fell to {scaler.get_scale():.2g})",
                math.inf,
                self._last_checkpoint,
            )

    def _save_progress(self, state: _EpochProgress) -> None:
        """A mid-epoch checkpoint: the weights and everything needed to go on from here."""
        self._check_finite()  # never save a non-finite state
        self._agree_bn()
        rng = self._rng_states()
        if self.dist.is_main:
            path = self.out_dir / "checkpoints" / "last.pt"
            save_checkpoint(self._checkpoint_state((state.epoch, state.step), state, rng), path)
        self._after_save()

    def _agree_bn(self) -> None:
        """Average the BN running statistics (of the EMA and extra models too) over the ranks.

        Each rank's forwards move them with its own images, and DDP broadcasts rank 0's
        buffers only at the start of a synchronised forward (the shared-prefix ST step runs
        none), so ranks drift apart. Called before every evaluation, where each rank
        evaluates its shard, and every save, where rank 0 writes.
        """
        if not self.dist.enabled:
            return
        models = [self.model, *self.method.extra_models().values()]
        if self.ema is not None:
            models.append(self.ema.module)
        seen: set[int] = set()
        for model in map(unwrap_model, models):
            if id(model) not in seen:  # motivation's base model is the main one
                seen.add(id(model))
                distribute_bn(model, self.dist.world_size, reduce=True)

    def _after_save(self) -> None:
        self._last_checkpoint = self.out_dir / "checkpoints" / "last.pt"
        self._last_save = time.monotonic()
        # Under torchrun an exiting rank ends the others: they wait until the file is whole.
        barrier()

    def _sync_lr(self) -> None:
        """The schedule drives the first optimizer; the others follow it group by group."""
        lead, *others = self.method.optimizers
        for optimizer in others:
            for group, lead_group in zip(optimizer.param_groups, lead.param_groups):
                group["lr"] = lead_group["lr"]

    def _calib(self):
        return self.data.calibration_batches(batch_size=self.cfg.eval.batch_size)

    def _eval_batches(self, split: str) -> Callable[[], Any]:
        return lambda: self.data.eval_batches(split, batch_size=self.cfg.eval.batch_size)

    def evaluate_epoch(self) -> dict[str, Any]:
        self._agree_bn()
        with self.precision.autocast():  # with amp on CUDA, evaluate in its dtype too
            return self._evaluations()

    def _evaluations(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if getattr(self.method, "reestimates_main_bn", False):
            # BN policy "reference": sub-network forwards moved the main statistics; the
            # reference code re-estimates them from training images before evaluating.
            with kept_modes(self.model):
                bn.recalibrate(self.model, self._calib())
        test = evaluate(self.model, self._eval_batches("test")())
        out.update(test_acc=test["acc"], test_acc5=test["acc5"], test_loss=test["loss"])
        if self.data.n_val:
            out["val_acc"] = evaluate(self.model, self._eval_batches("val")())["acc"]
        if self.ema is not None:
            out["ema_test_acc"] = evaluate(self.ema.module, self._eval_batches("test")())["acc"]
        for name, model in self.method.extra_models().items():
            if model is self.model:  # e.g. motivation's base model: evaluated just above
                out[f"{name}_acc"] = test["acc"]
            else:
                out[f"{name}_acc"] = evaluate(model, self._eval_batches("test")())["acc"]
        if self.eval_subnets:
            # Shared-prefix evaluation: equal to evaluate_subnets, several times faster.
            results = self._on_test_split(evaluate_subnets_shared, self.eval_subnets)
            out["subnets"] = [{"subnet": r["subnet"], "acc": r["acc"]} for r in results]
        return out

    def _on_test_split(self, evaluation: Callable, subnets: list) -> Any:
        """``evaluation`` (the shared-prefix evaluator or a KL snapshot) of ``subnets`` on the
        test split, BN re-estimated from training images, within ``eval.memory_mb``."""
        return evaluation(
            self.model,
            subnets,
            self._eval_batches("test"),
            self._calib,
            memory_mb=self.cfg.eval.memory_mb,
        )

    def _record_kl_drift(self, epoch: int) -> None:
        every = self.cfg.analysis.kl_drift_every
        if not every or (epoch + 1) % every:
            return
        with self.precision.autocast():
            snapshot = self._on_test_split(kl_drift_snapshot, self.kl_drift_subnets)
        if self.dist.is_main:
            append_kl_drift(self.out_dir, epoch, snapshot)

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
        lock = RunLock(self.out_dir) if self.dist.is_main else None
        if lock is not None:
            lock.acquire()
            if lock.took_over is not None:
                owner = lock.took_over
                logger.warning(
                    f"took over the stale lock of pid {owner.get('pid')} on {owner.get('host')}"
                )
        try:
            with StopSignals() as signals:
                self._signals = signals
                return self._fit(progress, step_hook)
        finally:
            self._signals = None
            if self.writer is not None:
                self.writer.close()
                self.writer = None
            if lock is not None:
                lock.release()

    def _fit(self, progress: bool, step_hook: Callable[[int, int], None] | None) -> dict:
        self._wall_start = time.perf_counter()
        self._prepare_folder()
        if self.resume:
            self._restore()
        barrier()
        self._last_save = time.monotonic()
        record: dict[str, Any] = {}
        for epoch in range(self.start_epoch, self.cfg.epochs):
            epoch_start = time.perf_counter()
            train_stats = self.train_epoch(epoch, progress, step_hook)
            final = epoch == self.cfg.epochs - 1
            record = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"]}
            record.update({k: v for k, v in train_stats.items() if k != "train_seconds"})
            record.update(self.method.epoch_metrics())
            is_best = False
            if final or (epoch + 1) % self.cfg.eval.every == 0:
                record.update(self.evaluate_epoch())
                is_best = self._track_best(epoch, record)
            self._record_kl_drift(epoch)
            record["epoch_seconds"] = time.perf_counter() - epoch_start
            self._log(record)
            self._save(epoch, is_best)
            stop, _ = self._control_flags(0, 0, True)
            if stop and not final:
                raise TrainingInterrupted(
                    self._signal_name(), epoch, self.data.steps_per_epoch, self._last_checkpoint
                )
        if not record and self.dist.is_main:
            # resumed from the final checkpoint: the summary comes from the last log line
            record = _last_record(self.out_dir / METRICS_FILE)
        wall = self.wall_before + time.perf_counter() - self._wall_start
        summary = self._summary(record, wall)
        barrier()
        return summary

    def _track_best(self, epoch: int, record: dict[str, Any]) -> bool:
        """Whether this epoch is the best so far: chosen on the validation split, or the last
        evaluated epoch when none is held out (never on test)."""
        val = record.get("val_acc")
        if val is None or self.best["val_acc"] is None or val > self.best["val_acc"]:
            self.best = {"epoch": epoch, "val_acc": val, "test_acc": record["test_acc"]}
            return True
        return False

    def _save(self, epoch: int, is_best: bool) -> None:
        self._agree_bn()
        rng = self._rng_states()
        if self.dist.is_main:
            state = self._checkpoint_state((epoch, 0), None, rng)
            ckpt = self.out_dir / "checkpoints"
            save_checkpoint(state, ckpt / "last.pt")
            if is_best:
                atomic_save(state, ckpt / "best.pt")
        self._after_save()

    def _summary(self, last: dict[str, Any], wall_seconds: float) -> dict[str, Any]:
        if not self.dist.is_main:
            return {}
        from ..flops import count_flops, count_params

        side = self.data.test_img_size
        subnets = [
            {
                "subnet": r["subnet"],
                "acc": r["acc"],
                "flops": count_flops(self.model, side, self.data.in_chans, subnet=r["subnet"]),
                "params": count_params(self.model, subnet=r["subnet"]),
            }
            for r in last.get("subnets", [])
        ]
        summary = {
            "method": self.cfg.method,
            "model": self.cfg.model.name,
            "dataset": self.cfg.data.name,
            "epochs": self.cfg.epochs,
            "main_acc": last.get("test_acc"),
            "main_acc5": last.get("test_acc5"),
            "val_acc": last.get("val_acc"),
            "best_epoch": self.best["epoch"],
            "best_val_acc": self.best["val_acc"],
            "best_epoch_test_acc": self.best.get("test_acc"),
            "flops": count_flops(self.model, side, self.data.in_chans),
            "params": count_params(self.model),
            "wall_seconds": wall_seconds,
            "subnets": subnets,
            **self.data.bad_images.summary(),
        }
        if subnets:
            accs = [s["acc"] for s in subnets]
            summary["subnet_acc_mean"] = sum(accs) / len(accs)
            summary["subnet_acc_min"] = min(accs)
        if self.ema is not None:
            summary["ema_test_acc"] = last.get("ema_test_acc")
        for name, model in self.method.extra_models().items():
            summary[f"{name}_acc"] = last.get(f"{name}_acc")
            same = model is self.model
            flops = summary["flops"] if same else count_flops(model, side, self.data.in_chans)
            summary[f"flops_{name}"] = flops
            atomic_save(model.state_dict(), self.out_dir / f"{name}.pt")
        summary.update(self.method.summary_extras(summary))
        atomic_save(self.model.state_dict(), self.out_dir / "weights.pt")
        atomic_write_text(self.out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary


@dataclass
class _EpochProgress:
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
    def from_state(cls, state: dict[str, Any], device: torch.device) -> _EpochProgress:
        return cls(
            state["epoch"],
            state["step"],
            {k: v.to(device) for k, v in state["sums"].items()},
            dict(state["host_sums"]),
            float(state["seconds"]),
        )


class _FiniteWatch:
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


class _StepLog:
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


def _holds_a_run(folder: Path) -> bool:
    """Whether ``folder`` holds a run to resume or a finished one; a start stopped before its
    first checkpoint leaves only config.yaml (and perhaps logs) and counts as none."""
    last = folder / "checkpoints" / "last.pt"
    return any(p.exists() for p in (last, previous_path(last), folder / "summary.json"))


def _truncate_log(path: Path, before_epoch: int) -> None:
    """Keep the JSON lines of ``path`` whose ``epoch`` is below ``before_epoch``."""
    if not path.exists():
        return
    records = [r for r in read_metrics(path) if r["epoch"] < before_epoch]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def _last_record(path: Path) -> dict[str, Any]:
    records = read_metrics(path) if path.exists() else []
    return records[-1] if records else {}


def train(
    cfg: DictConfig, out_dir: str | Path, resume: bool = False, progress: bool | None = None
) -> dict[str, Any]:
    """Run a recipe into ``out_dir``; returns the summary. See :class:`Trainer`."""
    return Trainer(cfg, out_dir, resume=resume).fit(progress=progress)
