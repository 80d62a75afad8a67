"""Stimulative training (ST, NeurIPS'22) and ST++ as one step.

Per mini-batch: ``L = CE(main(x), y) + λ · Σ_j KL(main(x) ‖ sub_j(x_j))``. The main network's
output is the teacher (detached); each sub-network shares the main network's weights, is drawn
by a sampler, and is backpropagated as soon as it is computed, so memory does not grow with the
number of sub-networks. ST++ adds KL⁻ (logit direction only), several sub-networks per step,
a random smaller input per sub-network, and bounded sampling spaces.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..bn import frozen_stats
from ..elastic.sampling import OrderedSampler, StochasticSampler
from ..elastic.stages import find_stages, unwrap
from ..elastic.subnet import use_subnet
from ..losses import KL_NORMS, kl_loss, normalize_logits
from .base import MethodStep, Precision

__all__ = ["StimulativeTraining", "BN_POLICIES", "SUB_TARGETS"]

BN_POLICIES = ("protect", "reference")
SUB_TARGETS = ("teacher", "label")


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
    ):
        super().__init__(model, optimizer, precision, label_smoothing, criterion)
        if lam < 0:
            raise ValueError(f"st.lam={lam} must be >= 0")
        if num_subnets < 0:
            raise ValueError(f"st.num_subnets={num_subnets} must be >= 0")
        if kl_norm not in KL_NORMS:
            raise ValueError(f"st.kl_norm={kl_norm!r} must be one of {', '.join(KL_NORMS)}")
        if temperature <= 0:
            raise ValueError(f"st.temperature={temperature} must be > 0")
        if target not in SUB_TARGETS:
            raise ValueError(f"st.target={target!r} must be one of {', '.join(SUB_TARGETS)}")
        if bn not in BN_POLICIES:
            raise ValueError(f"st.bn={bn!r} must be one of {', '.join(BN_POLICIES)}")
        if start_epoch < 0:
            raise ValueError(f"st.start_epoch={start_epoch} must be >= 0")
        self.resize = _check_resize(resize, unwrap(model))
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

    @property
    def reestimates_main_bn(self) -> bool:
        """Whether the loop must re-estimate the main network's BN before evaluating."""
        return self.bn == "reference"

    def _sampling(self) -> bool:
        return self.epoch >= self.start_epoch and self.num_subnets > 0 and self.lam > 0

    def _resized(self, images: torch.Tensor) -> torch.Tensor:
        if self.resize is None:
            return images
        crop = images.shape[-1]
        lo, hi = int(self.resize[0] * crop), int(self.resize[1] * crop)
        side = int(torch.randint(max(lo, 1), max(hi, 1) + 1, (1,), generator=self.generator))
        if side == crop:
            return images
        return F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        sampling = self._sampling()
        with self.sync_gradients(last=not sampling):
            with self.precision.autocast():
                logits = self.model(images).float()
            main_logits = logits
            if self.norm_main_ce:
                main_logits = normalize_logits(logits, self.kl_norm, self.amplitude)
            ce = self.criterion(main_logits, labels)
            self.precision.backward(ce)
        ce = ce.detach()  # loss terms stay on the device: reading them would stall the step
        if not sampling:
            return {"loss": ce, "ce": ce, "kl": torch.zeros_like(ce), "subnets": []}

        teacher = logits.detach()
        terms, drawn = [], []
        # "reference": sub-network forwards update the running statistics, as the reference code
        bn_guard = frozen_stats if self.bn == "protect" else contextlib.nullcontext
        for j in range(self.num_subnets):
            subnet = self.sampler.sample(self.generator)
            inputs = self._resized(images)
            drawn.append(str(subnet))
            with self.sync_gradients(last=j == self.num_subnets - 1):
                with use_subnet(self.model, subnet, self.stages), bn_guard(self.model):
                    with self.precision.autocast():
                        sub_logits = self.model(inputs).float()
                if self.target == "teacher":
                    term = kl_loss(
                        sub_logits, teacher, self.kl_norm, self.temperature, self.amplitude
                    )
                else:
                    term = self.criterion(sub_logits, labels)
                self.precision.backward(self.lam * term)
            terms.append(term.detach())
        kl = torch.stack(terms)
        loss = ce + self.lam * kl.sum()
        return {"loss": loss, "ce": ce, "kl": kl.mean(), "subnets": drawn}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])


def _check_resize(resize: Sequence[float] | None, model: nn.Module) -> tuple[float, float] | None:
    if resize is None:
        return None
    if len(resize) != 2 or not 0 < float(resize[0]) <= float(resize[1]) <= 1:
        raise ValueError(
            f"st.resize={list(resize)} must be [lo, hi] fractions of the crop, 0 < lo <= hi <= 1"
        )
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer) and not getattr(model, "dynamic_img_size", False):
        raise ValueError(
            "st.resize needs a ViT built with dynamic_img_size=True (set "
            "model.kwargs.dynamic_img_size=true), or st.resize=null"
        )
    return float(resize[0]), float(resize[1])
