"""Stimulative training (ST, NeurIPS'22) and ST++ as one step: Algorithm 1 of the papers.

Per mini-batch: ``L = CE(main(x), y) + λ · Σ_j KL(main(x) ‖ sub_j(x_j))``. The main network's
output is the teacher (detached); each sub-network shares the main network's weights and is
drawn by a sampler. ST++ adds KL⁻ (logit direction only), several sub-networks per step, a
random smaller input per sub-network, and bounded sampling spaces.

The step says what the losses are (:class:`STLoss`); a runner
(:mod:`nestedtrain.methods.runners`) runs the networks and backpropagates each sub-network's
term as soon as it is computed, so memory does not grow with the number of sub-networks. An
ordered sub-network on the main network's input computes exactly what the main network
computes up to the first block where they differ (train-mode BN normalises by the batch), so
by default the runner computes that shared prefix once
(:class:`~nestedtrain.methods.shared_prefix.SharedPrefixRunner`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..elastic.sampling import OrderedSampler, StochasticSampler
from ..elastic.stages import find_stages, model_family, unwrap
from ..errors import ConfigError
from ..losses import KL_NORMS, kl_loss, normalize_logits
from .base import MethodStep, Precision
from .runners import Drawn, PlainRunner
from .shared_prefix import SharedPrefixRunner, decide_shared_prefix

__all__ = [
    "BN_POLICIES",
    "RESIZE_PER",
    "SUB_TARGETS",
    "STLoss",
    "StimulativeTraining",
    "check_options",
    "shared_prefix_veto",
]

BN_POLICIES = ("protect", "reference")
SUB_TARGETS = ("teacher", "label")
RESIZE_PER = ("subnet", "step")

logger = logging.getLogger("nestedtrain")


@dataclass(frozen=True)
class STLoss:
    """ST's losses: the main network's CE and each sub-network's term, weighted by ``lam``.

    Attributes:
        criterion: ``(logits, targets) -> loss`` on labels.
        lam: λ, the weight of each sub-network's term.
        kl_norm: ``none`` (KL, ST), ``std`` (KL⁻ as the reference code: layer norm) or
            ``l2`` (KL⁻ as the paper's formula: unit vector).
        temperature: T; the KL is computed at T and multiplied by T².
        amplitude: scale of the normalised logits.
        norm_main_ce: the main network's CE on the normalised logits too (the reference
            code does so whenever KL⁻ is on).
        target: ``teacher`` (distil the main network) or ``label`` (sub-networks trained on
            the labels).
    """

    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    lam: float
    kl_norm: str
    temperature: float
    amplitude: float
    norm_main_ce: bool
    target: str

    def ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.norm_main_ce:
            logits = normalize_logits(logits, self.kl_norm, self.amplitude)
        return self.criterion(logits, labels)

    def term(
        self, sub_logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        if self.target == "teacher":
            return kl_loss(sub_logits, teacher, self.kl_norm, self.temperature, self.amplitude)
        return self.criterion(sub_logits, labels)


class StimulativeTraining(MethodStep):
    """ST / ST++ step.

    ``step`` returns ``loss``, ``ce`` and ``kl`` (the mean over the step's sub-networks) as
    detached 0-dim tensors on the model's device, and the drawn sub-networks' strings; nothing
    in it waits for the device.

    Args:
        model: the main network (optionally DDP-wrapped).
        optimizer: its optimizer.
        lam, kl_norm, temperature, amplitude, norm_main_ce, target: the losses (:class:`STLoss`).
        num_subnets: sub-networks per step.
        sampler: draws the sub-networks; ordered residual sampling over the full space when
            None.
        resize: ``(lo, hi)`` fractions of the training crop; each sub-network sees the batch
            resized (bilinear) to a side drawn uniformly from ``int(lo·crop) .. int(hi·crop)``.
        start_epoch: first epoch (0-based) that samples sub-networks; before it, CE only.
        bn: ``protect`` (sub-network forwards leave BN running statistics alone) or
            ``reference`` (they update them, as the reference code; re-estimate the main
            network's statistics before evaluating).
        generator: the sampler's and resize's random source; seeded 0 when None. Share its
            seed across ranks so every rank draws the same sub-networks.
        precision: autocast/grad scaling.
        label_smoothing: for the CE on hard labels.
        criterion: ``(logits, targets) -> loss`` on labels; CE when None.
        share_prefix: compute once what a sub-network shares with the main network (and
            with the step's other sub-networks): the stem and the blocks before the first
            one where their paths differ. Gradients, losses and BN statistics equal the
            plain runner's up to float summation order. It applies when the sub-network sees
            the same input, ``bn="protect"`` and the model's forward splits into stem, blocks
            and head; ``shared_prefix`` says whether it runs, or why not (also logged once),
            once decided.
        resize_per: with ``resize``, draw a side per sub-network (``"subnet"``, as the
            reference code) or one side per step for all of them (``"step"``: they then share
            prefixes among themselves).
        resize_multiple: with ``resize``, draw the side uniformly among the multiples of this
            within the range (8: about 14 sides at 224 px instead of ~128, so cuDNN's
            benchmark mode tunes a few shapes, each a multiple of the tensor cores' tile).
            1 draws every side, as the reference code.
        example_inputs: a few inputs like the training batches' (the trainer passes two
            test images): whether the shared prefix applies is decided here, with them;
            without them, on the first sampling step, with its batch.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lam: float = 1.0,
        num_subnets: int = 1,
        sampler: OrderedSampler | StochasticSampler | None = None,
        kl_norm: str = "none",
        temperature: float = 1.0,
        amplitude: float = 1.0,
        norm_main_ce: bool = False,
        resize: Sequence[float] | None = None,
        target: str = "teacher",
        start_epoch: int = 0,
        bn: str = "protect",
        generator: torch.Generator | None = None,
        precision: Precision | None = None,
        label_smoothing: float = 0.0,
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        share_prefix: bool = True,
        resize_per: str = "subnet",
        resize_multiple: int = 1,
        example_inputs: torch.Tensor | None = None,
    ):
        super().__init__(model, optimizer, precision, label_smoothing, criterion)
        check_options(
            lam=lam,
            num_subnets=num_subnets,
            kl_norm=kl_norm,
            temperature=temperature,
            target=target,
            bn=bn,
            start_epoch=start_epoch,
            resize_per=resize_per,
            resize_multiple=resize_multiple,
        )
        lam, temperature, amplitude = float(lam), float(temperature), float(amplitude)
        self.loss = STLoss(
            self.criterion, lam, kl_norm, temperature, amplitude, norm_main_ce, target
        )
        self.resize = _check_resize(resize, unwrap(model))
        self.resize_multiple = int(resize_multiple)
        self.resize_per = resize_per
        self.num_subnets = int(num_subnets)
        self.sampler = sampler if sampler is not None else OrderedSampler(unwrap(model))
        self.start_epoch = int(start_epoch)
        self.bn = bn
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.stages = find_stages(model)
        self.share_prefix = bool(share_prefix)
        self._plain = PlainRunner(model, self.precision, self.stages, protect_bn=bn == "protect")
        # "on: ..." or "off: <why>", once decided: here with example inputs, else on the first
        # sampling step
        self.shared_prefix: str | None = None
        self._shared: SharedPrefixRunner | None = None
        if example_inputs is not None and self.loss.lam > 0 and self.num_subnets > 0:
            self._runner(example_inputs)

    @property
    def reestimates_main_bn(self) -> bool:
        """Whether the loop must re-estimate the main network's BN before evaluating."""
        return self.bn == "reference"

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """Algorithm 1 on one batch: draw the sub-networks; the main network's forward and
        CE, then each sub-network's term, each backpropagated as soon as it is computed (by
        the runner); ``loss = ce + λ·Σ terms``."""
        drawn = self._draw(images.shape[-1]) if self._sampling() else []
        runner = self._runner(images) if drawn else self._plain
        ce, terms = runner.run(images, labels, drawn, self.loss)
        loss = ce + self.loss.lam * terms.sum()
        kl = terms.mean() if drawn else torch.zeros_like(ce)
        return {"loss": loss, "ce": ce, "kl": kl, "subnets": [str(s) for s, _ in drawn]}

    def _sampling(self) -> bool:
        return self.epoch >= self.start_epoch and self.num_subnets > 0 and self.loss.lam > 0

    def _draw(self, crop: int) -> list[Drawn]:
        """The step's sub-networks and the side each one sees, drawn in one order whichever
        runner runs them: sub-network, then its side (``resize_per="subnet"``), or every
        sub-network, then one side (``resize_per="step"``)."""

        def side() -> int:
            return _draw_side(self.resize, crop, self.resize_multiple, self.generator)

        if self.resize_per == "step":
            subnets = [self.sampler.sample(self.generator) for _ in range(self.num_subnets)]
            common = side()
            return [Drawn(subnet, common) for subnet in subnets]
        drawn = []
        for _ in range(self.num_subnets):
            subnet = self.sampler.sample(self.generator)
            drawn.append(Drawn(subnet, side()))
        return drawn

    def _runner(self, images: torch.Tensor) -> SharedPrefixRunner | PlainRunner:
        """The shared-prefix runner when it applies, else the plain one; decided once (the
        model is probed with ``images``) and logged, with the reason when it does not apply."""
        if self.shared_prefix is None:
            why_not = shared_prefix_veto(self.share_prefix, self.bn)
            split, status = decide_shared_prefix(self.model, self.stages, images, why_not)
            if split is not None:
                where = "the main network's input" if self.resize is None else "the same input"
                status = f"on: sub-networks that see {where} compute shared blocks once"
                self._shared = SharedPrefixRunner(self.model, split, self.stages, self.precision)
            self.shared_prefix = status
            logger.info("ST shared prefix %s", status)
        return self._shared or self._plain

    def summary_extras(self, summary: dict[str, Any]) -> dict[str, Any]:
        return {"st_shared_prefix": self.shared_prefix} if self.shared_prefix else {}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])


def shared_prefix_veto(share_prefix: bool, bn: str) -> str | None:
    """Why the options alone rule out the shared prefix (None when they do not)."""
    if not share_prefix:
        return "st.share_prefix is off"
    if bn == "reference":
        # The reference code's sub-network forwards update the running statistics of the
        # blocks they share with the main network a second time; only the plain runner,
        # which runs those forwards, keeps that.
        return "st.bn=reference updates BN statistics in every sub-network forward"
    return None


def _draw_side(
    resize: tuple[float, float] | None, crop: int, multiple: int, generator: torch.Generator
) -> int:
    """A side drawn uniformly from ``int(lo·crop) .. int(hi·crop)`` (``crop`` without
    ``resize``), among the multiples of ``multiple`` when it is above 1."""
    if resize is None:
        return crop
    lo, hi = max(int(resize[0] * crop), 1), max(int(resize[1] * crop), 1)
    m = multiple
    if m == 1:
        return int(torch.randint(lo, hi + 1, (1,), generator=generator))
    # the multiples of m in [lo, hi]; when there is none, the one just above hi (>= m)
    first, last = -(-lo // m), hi // m
    if first > last:
        return (last + 1) * m
    return m * int(torch.randint(first, last + 1, (1,), generator=generator))


def check_options(**options: Any) -> None:
    """The ranges of the options ``lam``, ``num_subnets``, ``kl_norm``, ``temperature``,
    ``target``, ``bn``, ``start_epoch``, ``resize_per`` and ``resize_multiple``: the first one
    out of range raises ConfigError, named as the recipe's ``st.<option>`` (recipes are
    checked with this too; other keys are ignored)."""
    o = options
    checks = [
        (o["lam"] >= 0, f"st.lam={o['lam']} must be >= 0"),
        (o["num_subnets"] >= 0, f"st.num_subnets={o['num_subnets']} must be >= 0"),
        (
            o["kl_norm"] in KL_NORMS,
            f"st.kl_norm={o['kl_norm']!r} must be one of {', '.join(KL_NORMS)}",
        ),
        (o["temperature"] > 0, f"st.temperature={o['temperature']} must be > 0"),
        (
            o["target"] in SUB_TARGETS,
            f"st.target={o['target']!r} must be one of {', '.join(SUB_TARGETS)}",
        ),
        (o["bn"] in BN_POLICIES, f"st.bn={o['bn']!r} must be one of {', '.join(BN_POLICIES)}"),
        (o["start_epoch"] >= 0, f"st.start_epoch={o['start_epoch']} must be >= 0"),
        (
            o["resize_per"] in RESIZE_PER,
            f"st.resize_per={o['resize_per']!r} must be one of {', '.join(RESIZE_PER)}",
        ),
        (o["resize_multiple"] >= 1, f"st.resize_multiple={o['resize_multiple']} must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _check_resize(resize: Sequence[float] | None, model: nn.Module) -> tuple[float, float] | None:
    if resize is None:
        return None
    if len(resize) != 2 or not 0 < float(resize[0]) <= float(resize[1]) <= 1:
        raise ConfigError(
            f"st.resize={list(resize)} must be [lo, hi] fractions of the crop, 0 < lo <= hi <= 1"
        )
    if model_family(model) == "timm-vit" and not getattr(model, "dynamic_img_size", False):
        raise ConfigError(
            "st.resize needs a ViT built with dynamic_img_size=True (set "
            "model.kwargs.dynamic_img_size=true), or st.resize=null"
        )
    return float(resize[0]), float(resize[1])
