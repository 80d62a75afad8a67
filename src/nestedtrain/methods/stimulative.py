"""Stimulative training (ST, NeurIPS'22) and ST++ as one step.

Per mini-batch: ``L = CE(main(x), y) + λ · Σ_j KL(main(x) ‖ sub_j(x_j))``. The main network's
output is the teacher (detached); each sub-network shares the main network's weights, is drawn
by a sampler, and is backpropagated as soon as it is computed, so memory does not grow with the
number of sub-networks. ST++ adds KL⁻ (logit direction only), several sub-networks per step,
a random smaller input per sub-network, and bounded sampling spaces.

An ordered sub-network on the main network's input computes exactly what the main network
computes up to the first block where they differ (train-mode BN normalises by the batch), so
the step computes that shared prefix once (``share_prefix``, on by default; see
:meth:`StimulativeTraining._shared_step`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..bn import frozen_stats
from ..elastic.sampling import OrderedSampler, StochasticSampler
from ..elastic.stages import find_stages, model_family, unwrap
from ..elastic.subnet import Subnet, use_subnet
from ..elastic.trie import build_trie
from ..errors import ConfigError
from ..losses import KL_NORMS, kl_loss, normalize_logits
from .base import MethodStep, Precision
from .shared_prefix import PrefixSharing, decide_prefix_sharing

__all__ = ["StimulativeTraining", "BN_POLICIES", "RESIZE_PER", "SUB_TARGETS", "check_options"]

BN_POLICIES = ("protect", "reference")
SUB_TARGETS = ("teacher", "label")
RESIZE_PER = ("subnet", "step")

logger = logging.getLogger("nestedtrain")


class StimulativeTraining(MethodStep):
    """ST / ST++ step.

    ``step`` returns ``loss``, ``ce`` and ``kl`` (the mean over the step's sub-networks) as
    detached 0-dim tensors on the model's device, and the drawn sub-networks' strings; nothing
    in it waits for the device.

    Args:
        model: the main network (optionally DDP-wrapped).
        optimizer: its optimizer.
        lam: λ, the weight of each sub-network's KL term.
        num_subnets: sub-networks per step.
        sampler: draws the sub-networks; ordered residual sampling over the full space when
            None.
        kl_norm: ``none`` (KL, ST), ``std`` (KL⁻ as the reference code: layer norm) or ``l2``
            (KL⁻ as the paper's formula: unit vector).
        temperature: T; the KL is computed at T and multiplied by T².
        amplitude: scale of the normalised logits.
        norm_main_ce: compute the main network's CE on the normalised logits as well (the
            reference code does so whenever KL⁻ is on).
        resize: ``(lo, hi)`` fractions of the training crop; each sub-network sees the batch
            resized (bilinear) to a side drawn uniformly from ``int(lo·crop) .. int(hi·crop)``.
        target: ``teacher`` (distil the main network) or ``label`` (sub-networks trained on
            the labels, for fine-tuning).
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
            plain step's up to float summation order. It applies when the sub-network sees
            the same input, ``bn="protect"``, the model draws no random numbers in train mode
            and its forward splits into stem, blocks and head; ``prefix_sharing`` says whether
            it runs, or why not (also logged once), once decided.
        resize_per: with ``resize``, draw a side per sub-network (``"subnet"``, as the
            reference code) or one side per step for all of them (``"step"``: they then share
            prefixes among themselves).
        resize_multiple: with ``resize``, draw the side uniformly among the multiples of this
            within the range (8: about 14 sides at 224 px instead of ~128, so cuDNN's
            benchmark mode tunes a few shapes, each a multiple of the tensor cores' tile).
            1 draws every side, as the reference code.
        example_inputs: a few inputs like the training batches' (the trainer passes two
            test images): whether the shared path applies is decided here, with them; without
            them, on the first sampling step, with its batch.
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
        self.resize = _check_resize(resize, unwrap(model))
        self.resize_multiple = int(resize_multiple)
        self.lam = float(lam)
        self.num_subnets = int(num_subnets)
        self.sampler = sampler if sampler is not None else OrderedSampler(unwrap(model))
        self.kl_norm = kl_norm
        self.temperature = float(temperature)
        self.amplitude = float(amplitude)
        self.norm_main_ce = bool(norm_main_ce)
        self.target = target
        self.start_epoch = int(start_epoch)
        self.bn = bn
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.stages = find_stages(model)
        self.share_prefix = bool(share_prefix)
        self.resize_per = resize_per
        # "on: ..." or "off: <why>", once decided: here with example inputs, else on the first
        # sampling step
        self.prefix_sharing: str | None = None
        self._sharing: PrefixSharing | None = None
        if example_inputs is not None and self.lam > 0 and self.num_subnets > 0:
            self._prefix_sharing(example_inputs)

    @property
    def reestimates_main_bn(self) -> bool:
        """Whether the loop must re-estimate the main network's BN before evaluating."""
        return self.bn == "reference"

    def _sampling(self) -> bool:
        return self.epoch >= self.start_epoch and self.num_subnets > 0 and self.lam > 0

    def _draw(self, crop: int) -> list[tuple[Subnet, int]]:
        """The step's sub-networks and the side each one sees, drawn in the same order
        whichever path runs them: sub-network, then its side (``resize_per="subnet"``), or
        every sub-network, then one side (``resize_per="step"``)."""

        def side() -> int:
            return _draw_side(self.resize, crop, self.resize_multiple, self.generator)

        if self.resize_per == "step":
            subnets = [self.sampler.sample(self.generator) for _ in range(self.num_subnets)]
            common = side()
            return [(subnet, common) for subnet in subnets]
        drawn = []
        for _ in range(self.num_subnets):
            subnet = self.sampler.sample(self.generator)
            drawn.append((subnet, side()))
        return drawn

    @staticmethod
    def _resized(images: torch.Tensor, side: int) -> torch.Tensor:
        if side == images.shape[-1]:
            return images
        return F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)

    def _term(self, sub_logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor):
        if self.target == "teacher":
            return kl_loss(sub_logits, teacher, self.kl_norm, self.temperature, self.amplitude)
        return self.criterion(sub_logits, labels)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        if not self._sampling():
            with self.sync_gradients(last=True):
                ce, _ = self._main_forward_backward(images, labels)
            return {"loss": ce, "ce": ce, "kl": torch.zeros_like(ce), "subnets": []}
        drawn = self._draw(images.shape[-1])
        sharing = self._prefix_sharing(images)
        if sharing is None:
            terms, ce = self._plain_step(images, labels, drawn)
        else:
            terms, ce = self._shared_step(sharing, images, labels, drawn)
        kl = torch.stack(terms)
        loss = ce + self.lam * kl.sum()
        return {"loss": loss, "ce": ce, "kl": kl.mean(), "subnets": [str(s) for s, _ in drawn]}

    def _main_forward_backward(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        same_as_main: Sequence[int] = (),
        terms: list | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The main network's forward, its CE backward, and the loss terms (into ``terms``)
        of the drawn sub-networks ``same_as_main`` that are the main network itself.
        Returns the detached CE and the teacher logits."""
        with self.precision.autocast():
            logits = self.model(images).float()
        main_logits = logits
        if self.norm_main_ce:
            main_logits = normalize_logits(logits, self.kl_norm, self.amplitude)
        ce = self.criterion(main_logits, labels)
        teacher = logits.detach()
        loss = ce
        for j in same_as_main:
            term = self._term(logits, teacher, labels)
            terms[j] = term.detach()
            loss = loss + self.lam * term
        self.precision.backward(loss)
        # Loss terms stay on the device: reading them would stall the step.
        return ce.detach(), teacher

    # ------------------------------------------------------------------ the plain path
    def _plain_step(
        self, images: torch.Tensor, labels: torch.Tensor, drawn: list[tuple[Subnet, int]]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Main network, then each sub-network whole, each backpropagated at once."""
        with self.sync_gradients(last=False):
            ce, teacher = self._main_forward_backward(images, labels)
        terms = []
        for j, (subnet, side) in enumerate(drawn):
            with self.sync_gradients(last=j == len(drawn) - 1):
                term = self._subnet_whole(subnet, self._resized(images, side), teacher, labels)
            terms.append(term)
        return terms, ce

    def _subnet_whole(
        self, subnet: Subnet, inputs: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        # "reference": sub-network forwards update the running statistics, as the reference
        # code does; "protect" leaves them to the main network.
        bn_guard = frozen_stats if self.bn == "protect" else contextlib.nullcontext
        with use_subnet(self.model, subnet, self.stages), bn_guard(self.model):
            with self.precision.autocast():
                sub_logits = self.model(inputs).float()
        term = self._term(sub_logits, teacher, labels)
        self.precision.backward(self.lam * term)
        return term.detach()

    # ----------------------------------------------------------------- the shared path
    def _prefix_sharing(self, images: torch.Tensor) -> PrefixSharing | None:
        """The shared path's runner when it applies, else None; decided once (the model is
        probed with ``images``) and logged, with the reason when it does not apply."""
        if self.prefix_sharing is not None:
            return self._sharing
        why_not = shared_path_veto(self.share_prefix, self.bn)
        split, status = decide_prefix_sharing(self.model, self.stages, images, why_not)
        if split is not None:
            where = "the main network's input" if self.resize is None else "the same input"
            status = f"on: sub-networks that see {where} compute shared blocks once"
            self._sharing = PrefixSharing(
                self.model, split, self.stages, self.precision, self._term, self.lam
            )
        self.prefix_sharing = status
        logger.info("ST shared prefix %s", status)
        return self._sharing

    def _shared_step(
        self,
        sharing: PrefixSharing,
        images: torch.Tensor,
        labels: torch.Tensor,
        drawn: list[tuple[Subnet, int]],
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The plain step's losses and gradients, computing every shared prefix once.

        The sub-networks that see the main network's input branch off the main network's
        forward (:meth:`PrefixSharing.main_and_branches`). Held at any time: the main
        network's activations up to the cut, and one sub-network's rest. Sub-networks that
        see another size share prefixes among themselves, per size. Under DDP every backward
        accumulates locally and the gradients are all-reduced once, at the end.
        """
        crop = images.shape[-1]
        terms: list = [None] * len(drawn)
        same = [j for j, (_, side) in enumerate(drawn) if side == crop]
        others: dict[int, list[int]] = {}
        for j, (_, side) in enumerate(drawn):
            if side != crop:
                others.setdefault(side, []).append(j)
        with self.local_gradients():
            ce, teacher = sharing.main_and_branches(
                lambda at_head: self._main_forward_backward(images, labels, at_head, terms),
                [drawn[j][0] for j in same],
                labels,
                same,
                terms,
            )
            for side, group in others.items():
                inputs = self._resized(images, side)
                if len(group) == 1:
                    j = group[0]
                    terms[j] = self._subnet_whole(drawn[j][0], inputs, teacher, labels)
                    continue
                root = build_trie([drawn[j][0] for j in group])
                with sharing.sub_forwards():
                    sharing.run_subtree(root, inputs, teacher, labels, group, terms)
        self.all_reduce_gradients()
        return terms, ce

    def summary_extras(self, summary: dict[str, Any]) -> dict[str, Any]:
        return {"st_shared_prefix": self.prefix_sharing} if self.prefix_sharing else {}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])


def shared_path_veto(share_prefix: bool, bn: str) -> str | None:
    """Why the options alone rule out the shared path (None when they do not)."""
    if not share_prefix:
        return "st.share_prefix is off"
    if bn == "reference":
        # The reference code's sub-network forwards update the running statistics of the
        # blocks they share with the main network a second time; only the plain path, which
        # runs those forwards, keeps that.
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
