"""What a run evaluates at an epoch's end: the main network, its EMA and other models, and the
chosen sub-networks; and the KL-drift snapshots of ``analysis.kl_drift_every``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .. import bn
from ..data import Data
from ..distributed import input_memory_format
from ..elastic.sampling import subnets_from_spec
from ..evaluation import evaluate, evaluate_subnets, kl_drift_snapshot
from ..methods import MethodStep
from ..modes import kept_modes

__all__ = ["EpochEvaluation"]


class EpochEvaluation:
    """The evaluations of one run, on its data, with the recipe's ``eval`` settings."""

    def __init__(self, cfg: Any, model: nn.Module, method: MethodStep, ema: Any, data: Data):
        self.model, self.method, self.ema, self.data = model, method, ema, data
        self.batch_size, self.memory_mb = cfg.eval.batch_size, cfg.eval.memory_mb
        self.subnets = subnets_from_spec(model, cfg.eval.subnets, seed=cfg.seed)
        drift = cfg.analysis.kl_drift_subnets if cfg.analysis.kl_drift_every else "none"
        self.drift_subnets = subnets_from_spec(model, drift, seed=cfg.seed)
        # The inputs in the model's memory format, as training gives them (channels-last on
        # CUDA): else every convolution converts its input, and cuDNN tunes both formats.
        self.memory_format = input_memory_format(data.device, cfg.channels_last)

    def _formatted(self, images: torch.Tensor) -> torch.Tensor:
        if self.memory_format == torch.contiguous_format:
            return images  # the CPU, or channels_last off: the batch as the data gives it
        return images.contiguous(memory_format=self.memory_format)

    def _calib(self):
        batches = self.data.calibration_batches(batch_size=self.batch_size)
        return map(self._formatted, batches)

    def _batches(self, split: str) -> Callable[[], Any]:
        def batches():
            for images, labels in self.data.eval_batches(split, batch_size=self.batch_size):
                yield self._formatted(images), labels

        return batches

    def epoch(self) -> dict[str, Any]:
        """``test_acc``, ``test_acc5``, ``test_loss``, ``val_acc`` (with a validation split),
        ``ema_test_acc``, ``<model>_acc`` for the method's other models (``<model>_acc_raw``
        too for those evaluated with re-estimated BN statistics), ``subnets``."""
        if self.method.reestimates_main_bn:
            # BN policy "reference": sub-network forwards moved the main statistics; the
            # reference code re-estimates them from training images before evaluating.
            with kept_modes(self.model):
                bn.recalibrate(self.model, self._calib())
        test = evaluate(self.model, self._batches("test")())
        out = {"test_acc": test["acc"], "test_acc5": test["acc5"], "test_loss": test["loss"]}
        if self.data.n_val:
            out["val_acc"] = evaluate(self.model, self._batches("val")())["acc"]
        if self.ema is not None:
            out["ema_test_acc"] = evaluate(self.ema.module, self._batches("test")())["acc"]
        for name, model in self.method.extra_models().items():
            if model is self.model:  # e.g. motivation's base model: evaluated just above
                out[f"{name}_acc"] = test["acc"]
                continue
            out[f"{name}_acc"] = evaluate(model, self._batches("test")())["acc"]
            if name in self.method.recalibrated_models:
                out[f"{name}_acc_raw"] = out[f"{name}_acc"]
                with self.recalibrated(model):
                    out[f"{name}_acc"] = evaluate(model, self._batches("test")())["acc"]
        if self.subnets:
            # BN re-estimated for each sub-network; the blocks they share run once.
            results = self._on_test_split(evaluate_subnets, self.subnets)
            out["subnets"] = [{"subnet": r["subnet"], "acc": r["acc"]} for r in results]
        return out

    def recalibrated(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """``model`` with BN statistics re-estimated from the calibration images inside, its
        own back on exit (:func:`nestedtrain.bn.recalibrated`)."""
        return bn.recalibrated(model, self._calib())

    @contextlib.contextmanager
    def as_evaluated(self, models: dict[str, nn.Module]) -> Iterator[None]:
        """Inside, the method's ``recalibrated_models`` among ``models`` (by name) have the BN
        statistics they are evaluated with; their own come back on exit."""
        with contextlib.ExitStack() as stack:
            for name in self.method.recalibrated_models:
                stack.enter_context(self.recalibrated(models[name]))
            yield

    def kl_drift(self) -> dict[str, float]:
        """KL(main || sub-network) on the test split for the drift sub-networks."""
        return self._on_test_split(kl_drift_snapshot, self.drift_subnets)

    def _on_test_split(self, evaluation: Callable, subnets: list) -> Any:
        """``evaluation`` (:func:`~nestedtrain.evaluation.evaluate_subnets` or
        :func:`~nestedtrain.evaluation.kl_drift_snapshot`) of ``subnets`` on the test split, BN
        re-estimated for each from training images, within ``eval.memory_mb``."""
        return evaluation(
            self.model, subnets, self._batches("test"), self._calib, memory_mb=self.memory_mb
        )
