"""The training loop: one method step per batch, then evaluation, logs and checkpoints.

The loop is method-agnostic: a method step (``nestedtrain.methods``) runs the forwards and
backwards; the loop steps the optimizer, the schedule and the EMA, evaluates the main network
and a set of sub-networks each epoch, and writes the run folder.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from omegaconf import DictConfig, OmegaConf
from timm.loss import BinaryCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from tqdm import tqdm

from .. import __version__, bn
from ..data import Data, build_data
from ..elastic.sampling import build_sampler
from ..methods import CommonTraining, MethodStep, Precision, StimulativeTraining
from ..methods.motivation import build_motivation
from .checkpoint import CHECKPOINT_FORMAT, atomic_save, build_model, load_checkpoint
from .config import plain, to_yaml
from .distributed import all_reduce_mean, barrier, init_distributed
from .evaluate import evaluate, select_subnets

__all__ = ["METHOD_BUILDERS", "Trainer", "build_method", "criterion_from_config", "train"]


def criterion_from_config(
    cfg: DictConfig,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The supervised loss a recipe asks for: timm's BCE for ``loss: bce``, else None (the
    method's default, CE with ``data.label_smoothing``)."""
    if cfg.loss == "bce":
        return BinaryCrossEntropy(smoothing=cfg.data.label_smoothing)
    return None


def _build_ct(trainer: Trainer) -> MethodStep:
    cfg = trainer.cfg
    return CommonTraining(
        trainer.wrapped,
        trainer.optimizer,
        trainer.precision,
        cfg.data.label_smoothing,
        criterion=criterion_from_config(cfg),
    )


def _build_st(trainer: Trainer) -> MethodStep:
    cfg, st = trainer.cfg, trainer.cfg.st
    sampler = build_sampler(trainer.model, kind=st.sampler, space=plain(st.space), p=st.p)
    return StimulativeTraining(
        trainer.wrapped,
        trainer.optimizer,
        lam=st.lam,
        num_subnets=st.num_subnets,
        sampler=sampler,
        kl_norm=st.kl_norm,
        temperature=st.temperature,
        amplitude=st.amplitude,
        norm_main_ce=st.norm_main_ce,
        resize=plain(st.resize),
        target=st.target,
        start_epoch=st.start_epoch,
        bn=st.bn,
        generator=trainer.generator,
        precision=trainer.precision,
        label_smoothing=cfg.data.label_smoothing,
        criterion=criterion_from_config(cfg),
    )


# method name -> builder(trainer): the trainer's model (``trainer.model``, DDP-wrapped as
# ``trainer.wrapped``), optimizer, precision, generator, data and helpers are set up by then.
METHOD_BUILDERS: dict[str, Callable[[Trainer], MethodStep]] = {
    "ct": _build_ct,
    "st": _build_st,
    "stpp": _build_st,
    "motivation": build_motivation,
}


def build_method(trainer: Trainer) -> MethodStep:
    """The step object of ``trainer.cfg.method``."""
    method = trainer.cfg.method
    if method not in METHOD_BUILDERS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHOD_BUILDERS)}")
    return METHOD_BUILDERS[method](trainer)


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


def _load_init_weights(model: nn.Module, path: str) -> None:
    """Weights from a nestedtrain checkpoint or a plain state_dict; a new classifier when the
    number of classes differs (fine-tuning)."""
    source = Path(path)
    if not source.is_file():
        raise ValueError(
            f"model.init_from={path!r} does not exist: give a checkpoint or weights file"
        )
    try:
        state = torch.load(source, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(
            f"model.init_from={path!r} is not readable by torch.load ({type(err).__name__})"
        ) from None
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"model.init_from={path!r} holds neither a nestedtrain checkpoint nor a state_dict"
        )
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    classifier = _classifier_prefix(model)
    if any(not k.startswith(classifier) for k in mismatched):
        bad = next(k for k in mismatched if not k.startswith(classifier))
        raise ValueError(
            f"model.init_from={path!r} does not fit {model.__class__.__name__}: {bad} has shape "
            f"{tuple(state[bad].shape)}, the model needs {tuple(own[bad].shape)}"
        )
    kept = {k: v for k, v in state.items() if k not in mismatched}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    missing = [k for k in missing if not k.startswith(classifier)]
    if missing or unexpected:
        raise ValueError(
            f"model.init_from={path!r} does not fit {model.__class__.__name__}: "
            f"{len(missing)} missing and {len(unexpected)} unexpected tensors "
            f"(first: {(missing + unexpected)[0]})"
        )


def _classifier_prefix(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier", "fc")
    return (name[0] if isinstance(name, (list, tuple)) else name) + "."


class Trainer:
    """Everything one training run needs; :meth:`fit` runs it.

    Construction validates the whole setup (model, data, method) before anything is written,
    so a bad recipe leaves no run folder behind.
    """

    def __init__(self, cfg: DictConfig, out_dir: str | Path, resume: bool = False):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.resume = resume
        if resume and not (self.out_dir / "checkpoints" / "last.pt").is_file():
            raise ValueError(
                f"--resume: {str(self.out_dir)!r} has no checkpoints/last.pt to resume from"
            )
        if not resume and (self.out_dir / "config.yaml").exists():
            raise ValueError(
                f"run folder {str(self.out_dir)!r} already holds a run: pass --resume to continue "
                "it, or choose another --out"
            )
        self.dist, self.device = init_distributed(cfg.device)
        _seed_everything(cfg.seed)
        self.data: Data = build_data(
            cfg.data,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            device=self.device,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.model = self._build_model()
        self._check_forward()
        self.optimizer = self.make_optimizer(self.model)
        self.scheduler = self._build_scheduler()
        self.precision = Precision(self.device, cfg.amp, cfg.amp_dtype)
        # One generator for sub-network draws, seeded alike on every rank so all ranks draw
        # the same sub-networks.
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.wrapped = self.wrap_ddp(self.model)
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

    # ------------------------------------------------------------------------------ setup
    def _build_model(self) -> nn.Module:
        cfg = self.cfg
        try:
            model = build_model(cfg, self.data.num_classes, self.data.in_chans)
        except ValueError:
            raise
        except Exception as err:  # timm raises many kinds for a failed pretrained fetch
            if cfg.model.pretrained:
                raise ValueError(
                    f"could not load pretrained weights for {cfg.model.name!r} "
                    f"({type(err).__name__}): this machine may not reach the weights hub; "
                    "use model.init_from=PATH instead"
                ) from None
            raise
        if cfg.model.init_from:
            _load_init_weights(model, cfg.model.init_from)
        model.to(self.device)
        if self.device.type == "cuda" and cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

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
            raise ValueError(
                f"model {self.cfg.model.name!r} cannot run on {self.cfg.data.name} images of "
                f"shape {tuple(images.shape[1:])}: {first} (set data.img_size or model.kwargs)"
            ) from None
        finally:
            self.model.train()

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """An optimizer for ``model`` as the recipe's ``optim`` section says (timm's factory)."""
        cfg = self.cfg.optim
        return create_optimizer_v2(
            model,
            opt=cfg.name,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.momentum,
            **({"eps": cfg.eps} if cfg.eps is not None else {}),
        )

    def _build_scheduler(self):
        cfg = self.cfg
        if cfg.sched.name == "none":
            return None
        scheduler, _ = create_scheduler_v2(
            self.optimizer,
            sched=cfg.sched.name,
            num_epochs=cfg.epochs,
            decay_epochs=cfg.sched.decay_epochs,
            decay_rate=cfg.sched.decay_rate,
            min_lr=cfg.sched.min_lr,
            warmup_lr=cfg.sched.warmup_lr,
            warmup_epochs=cfg.sched.warmup_epochs,
            cooldown_epochs=0,
            step_on_epochs=False,
            updates_per_epoch=self.data.steps_per_epoch,
        )
        scheduler.step(0)
        return scheduler

    def wrap_ddp(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel under torchrun, else itself."""
        if not self.dist.enabled:
            return model
        uses_subnets = self.cfg.method in ("st", "stpp")
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            # skipped blocks take no part in a sub-network's backward
            find_unused_parameters=uses_subnets,
        )

    # --------------------------------------------------------------------------- run folder
    def _prepare_folder(self) -> None:
        if not self.dist.is_main:
            return
        (self.out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        if self.resume:
            return
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
        (self.out_dir / "config.yaml").write_text(text)

    def _checkpoint_state(self, epoch: int) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "num_classes": self.data.num_classes,
            "in_chans": self.data.in_chans,
            "test_img_size": self.data.test_img_size,
            "model": self.model.state_dict(),
            "method": self.method.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": _rng_state(),
            "best": dict(self.best),
            "versions": {"nestedtrain": __version__, "torch": torch.__version__},
        }

    def _restore(self) -> None:
        state = load_checkpoint(self.out_dir / "checkpoints" / "last.pt", map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.method.load_state_dict(state["method"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        _set_rng_state(state["rng"])
        self.best = state["best"]
        self.start_epoch = state["epoch"] + 1
        if self.dist.is_main:
            # drop log lines of epochs after the checkpoint (a crash between log and save)
            metrics = self.out_dir / "metrics.jsonl"
            if metrics.exists():
                lines = [
                    line
                    for line in metrics.read_text().splitlines()
                    if line.strip() and json.loads(line)["epoch"] <= state["epoch"]
                ]
                metrics.write_text("".join(line + "\n" for line in lines))

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out_dir / "tensorboard"))
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "epoch" and value is not None:
                self.writer.add_scalar(key, value, record["epoch"])
        if record.get("subnets"):
            accs = [s["acc"] for s in record["subnets"]]
            self.writer.add_scalar("subnet_acc_mean", sum(accs) / len(accs), record["epoch"])
            self.writer.add_scalar("subnet_acc_min", min(accs), record["epoch"])
        self.writer.flush()

    # ----------------------------------------------------------------------------- epochs
    def train_epoch(self, epoch: int, progress: bool) -> dict[str, float]:
        model = self.method.model
        model.train()
        sums: dict[str, float] = {}
        steps = 0
        num_updates = epoch * self.data.steps_per_epoch
        bar = tqdm(
            total=self.data.steps_per_epoch,
            desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
            disable=not progress,
            leave=False,
            file=sys.stderr,
        )
        start = time.perf_counter()
        for images, labels in self.data.train_batches(epoch):
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
            for key, value in info.items():
                if isinstance(value, (int, float)):
                    sums[key] = sums.get(key, 0.0) + float(value)
            steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{info['loss']:.3f}")
        bar.close()
        seconds = time.perf_counter() - start
        if self.scheduler is not None:
            self.scheduler.step(epoch + 1)
            self._sync_lr()
        self.method.on_epoch_end(epoch)
        means = all_reduce_mean({k: v / max(steps, 1) for k, v in sums.items()}, self.device)
        images_seen = steps * self.cfg.batch_size
        return {**means, "train_seconds": seconds, "images_per_second": images_seen / seconds}

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
        out: dict[str, Any] = {}
        if getattr(self.method, "reestimates_main_bn", False):
            # BN policy "reference": sub-network forwards moved the main statistics; the
            # reference code re-estimates them from training images before evaluating.
            was_training = self.model.training
            bn.recalibrate(self.model, self._calib())
            self.model.train(was_training)
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
            from ..analysis.subnets import evaluate_subnets_shared

            results = evaluate_subnets_shared(
                self.model, self.eval_subnets, self._eval_batches("test"), self._calib
            )
            out["subnets"] = [{"subnet": r["subnet"], "acc": r["acc"]} for r in results]
        return out

    def _record_kl_drift(self, epoch: int) -> None:
        every = self.cfg.analysis.kl_drift_every
        if not every or (epoch + 1) % every:
            return
        from ..analysis.kl_drift import append_kl_drift, kl_drift_snapshot

        snapshot = kl_drift_snapshot(
            self.model, self.kl_drift_subnets, self._eval_batches("test"), self._calib
        )
        if self.dist.is_main:
            append_kl_drift(self.out_dir, epoch, snapshot)

    # -------------------------------------------------------------------------------- fit
    def fit(self, progress: bool | None = None) -> dict[str, Any]:
        """Train, evaluate and write the run folder; returns the summary (rank 0's)."""
        if progress is None:
            progress = self.dist.is_main and sys.stderr.isatty()
        self._prepare_folder()
        if self.resume:
            self._restore()
        barrier()
        wall_start = time.perf_counter()
        record: dict[str, Any] = {}
        for epoch in range(self.start_epoch, self.cfg.epochs):
            epoch_start = time.perf_counter()
            train_stats = self.train_epoch(epoch, progress)
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
        summary = self._summary(record, time.perf_counter() - wall_start)
        if self.writer is not None:
            self.writer.close()
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
        if not self.dist.is_main:
            return
        state = self._checkpoint_state(epoch)
        ckpt = self.out_dir / "checkpoints"
        atomic_save(state, ckpt / "last.pt")
        if is_best:
            atomic_save(state, ckpt / "best.pt")

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
            "best_epoch": self.best["epoch"],
            "best_val_acc": self.best["val_acc"],
            "best_epoch_test_acc": self.best.get("test_acc"),
            "flops": count_flops(self.model, side, self.data.in_chans),
            "params": count_params(self.model),
            "wall_seconds": wall_seconds,
            "subnets": subnets,
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
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def train(
    cfg: DictConfig, out_dir: str | Path, resume: bool = False, progress: bool | None = None
) -> dict[str, Any]:
    """Run a recipe into ``out_dir``; returns the summary. See :class:`Trainer`."""
    return Trainer(cfg, out_dir, resume=resume).fit(progress=progress)
