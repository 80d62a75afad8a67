"""The sandwich rule with in-place distillation, as one step: the elastic-network field's
standard way to train nested sub-networks (slimmable and US-Nets, Yu & Huang 2019; BigNAS,
Yu et al. 2020), here over depth.

Per mini-batch: ``L = CE(main(x), y) + λ · [KL(main(x) ‖ smallest(x)) + Σ_j KL(main(x) ‖
sub_j(x))]``: the largest network of the sampling space (the main network) learns from the
labels, the smallest one and ``num_subnets`` random ones from its detached output. It is ST
with the smallest sub-network added to every draw, so it runs on ST's paths as they are (the
shared-prefix runner, checkpoints, exact resume, sub-network evaluation, DDP) and takes ST's
options (``st.*`` in a recipe: sampler, space, λ, KL form, resize).
"""

from __future__ import annotations

from .runners import Drawn
from .stimulative import StimulativeTraining

__all__ = ["SandwichTraining"]


class SandwichTraining(StimulativeTraining):
    """Sandwich-rule step: the main network, the space's smallest sub-network and
    ``num_subnets`` random ones (so ``num_subnets + 1`` distillation terms a step, each of
    weight ``lam``). Arguments as :class:`~nestedtrain.methods.StimulativeTraining`; with
    ``resize`` the smallest sub-network sees the smallest side of the range, as BigNAS gives
    its smallest child the lowest resolution.
    """

    def _sampling(self) -> bool:
        # the smallest sub-network trains even with no random ones
        return self.epoch >= self.start_epoch and self.loss.lam > 0

    def _draw(self, crop: int) -> list[Drawn]:
        """The smallest sub-network first (it draws nothing from the generator), then ST's
        draw of ``num_subnets`` random ones."""
        return [Drawn(self.sampler.smallest(), self._smallest_side(crop)), *super()._draw(crop)]

    def _smallest_side(self, crop: int) -> int:
        if self.resize is None:
            return crop
        lo, m = max(int(self.resize[0] * crop), 1), self.resize_multiple
        return lo if m == 1 else -(-lo // m) * m
