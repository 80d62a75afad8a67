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
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..bn import frozen_stats
from ..distributed import all_ranks
from ..elastic.sampling import OrderedSampler, StochasticSampler
from ..elastic.split import ModelSplit, SplitError, TrieNode, build_trie, draws_random, run_path
from ..elastic.stages import find_stages, model_family, unwrap
from ..elastic.subnet import Subnet, use_subnet
from ..errors import ConfigError
from ..losses import KL_NORMS, kl_loss, normalize_logits
from .base import MethodStep, Precision

__all__ = ["StimulativeTraining", "BN_POLICIES", "RESIZE_PER", "SUB_TARGETS"]

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
            and its forward splits into stem, blocks and head; ``shared_prefix`` says after
            the first sampling step whether it runs, or why not (also logged once).
        resize_per: with ``resize``, draw a side per sub-network (``"subnet"``, as the
            reference code) or one side per step for all of them (``"step"``: they then share
            prefixes among themselves).
        resize_multiple: with ``resize``, draw the side uniformly among the multiples of this
            within the range (8: about 14 sides at 224 px instead of ~128, so cuDNN's
            benchmark mode tunes a few shapes, each a multiple of the tensor cores' tile).
            1 draws every side, as the reference code.
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
    ):
        super().__init__(model, optimizer, precision, label_smoothing, criterion)
        if lam < 0:
            raise ConfigError(f"st.lam={lam} must be >= 0")
        if num_subnets < 0:
            raise ConfigError(f"st.num_subnets={num_subnets} must be >= 0")
        if kl_norm not in KL_NORMS:
            raise ConfigError(f"st.kl_norm={kl_norm!r} must be one of {', '.join(KL_NORMS)}")
        if temperature <= 0:
            raise ConfigError(f"st.temperature={temperature} must be > 0")
        if target not in SUB_TARGETS:
            raise ConfigError(f"st.target={target!r} must be one of {', '.join(SUB_TARGETS)}")
        if bn not in BN_POLICIES:
            raise ConfigError(f"st.bn={bn!r} must be one of {', '.join(BN_POLICIES)}")
        if start_epoch < 0:
            raise ConfigError(f"st.start_epoch={start_epoch} must be >= 0")
        if resize_per not in RESIZE_PER:
            raise ConfigError(
                f"st.resize_per={resize_per!r} must be one of {', '.join(RESIZE_PER)}"
            )
        if resize_multiple < 1:
            raise ConfigError(f"st.resize_multiple={resize_multiple} must be >= 1")
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
        # Whether the shared path runs, and why not: decided on the first sampling step.
        self.shared_prefix: str | None = None
        self._split: ModelSplit | None = None
        self._main_subnet = Subnet(tuple(range(len(stage))) for stage in self.stages)

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
            if self.resize is None:
                return crop
            lo, hi = max(int(self.resize[0] * crop), 1), max(int(self.resize[1] * crop), 1)
            m = self.resize_multiple
            if m == 1:
                return int(torch.randint(lo, hi + 1, (1,), generator=self.generator))
            # the multiples of m in [lo, hi]; when there is none, the one just above hi (>= m)
            first, last = -(-lo // m), hi // m
            if first > last:
                return (last + 1) * m
            return m * int(torch.randint(first, last + 1, (1,), generator=self.generator))

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
        if self._shared_split(images) is None:
            terms, ce = self._plain_step(images, labels, drawn)
        else:
            terms, ce = self._shared_step(images, labels, drawn)
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
    def _shared_split(self, images: torch.Tensor) -> ModelSplit | None:
        """The model split into pieces when the shared path applies, else None; decided on
        the first sampling step and logged once, with the reason when it does not apply."""
        if self.shared_prefix is not None:
            return self._split
        reason = None
        if not self.share_prefix:
            reason = "st.share_prefix is off"
        elif self.bn == "reference":
            # The reference code's sub-network forwards update the running statistics of the
            # blocks they share with the main network a second time; only the plain path,
            # which runs those forwards, keeps that.
            reason = "st.bn=reference updates BN statistics in every sub-network forward"
        elif draws_random(self.module, images):
            reason = (
                "the model draws random numbers in train mode (dropout or drop-path), so a "
                "sub-network's prefix is not the main network's"
            )
        else:
            try:
                self._split = ModelSplit(self.module, self.stages, images[:2])
            except SplitError as err:
                reason = f"the model's forward cannot be split into stem, blocks and head ({err})"
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            # All ranks take one path: the shared one all-reduces gradients by hand, the
            # plain one in DDP's backward; ranks on different paths would hang.
            everywhere = all_ranks(reason is None, self.model.process_group, images.device)
            if reason is None and not everywhere:
                reason = "it does not apply on another rank"
                self._split = None
        if reason is None:
            where = "the main network's input" if self.resize is None else "the same input"
            self.shared_prefix = f"on: sub-networks that see {where} compute shared blocks once"
        else:
            self.shared_prefix = f"off: {reason}"
        logger.info("ST shared prefix %s", self.shared_prefix)
        return self._split

    def _shared_step(
        self, images: torch.Tensor, labels: torch.Tensor, drawn: list[tuple[Subnet, int]]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The plain step's losses and gradients, computing every shared prefix once.

        The sub-networks that see the main network's input form a trie with the main network
        (its spine). The main network's forward is cut at each spine node where a sub-network
        branches off: the rest of the forward continues from a leaf copy of the activation.
        After the main network's backward, the cut nodes are visited deepest first: the
        sub-networks branching off there run from the leaf and backpropagate into it, then
        the segment above the cut backpropagates the summed gradient once. Held at any time:
        the main network's activations up to the cut, and one sub-network's rest.

        Sub-networks that see another size share prefixes among themselves, per size. Under
        DDP every backward accumulates locally and the gradients are all-reduced once, at
        the end.
        """
        crop = images.shape[-1]
        terms: list = [None] * len(drawn)
        same = [j for j, (_, side) in enumerate(drawn) if side == crop]
        others: dict[int, list[int]] = {}
        for j, (_, side) in enumerate(drawn):
            if side != crop:
                others.setdefault(side, []).append(j)
        with self.local_gradients():
            ce, teacher = self._main_and_branches(images, labels, drawn, same, terms)
            for side, group in others.items():
                inputs = self._resized(images, side)
                if len(group) == 1:
                    j = group[0]
                    terms[j] = self._subnet_whole(drawn[j][0], inputs, teacher, labels)
                    continue
                root = build_trie([drawn[j][0] for j in group])
                with self._sub_forwards():
                    self._run_subtree(root, inputs, teacher, labels, group, terms)
        self.all_reduce_gradients()
        return terms, ce

    @contextlib.contextmanager
    def _sub_forwards(self) -> Iterator[None]:
        """BN statistics left alone (``protect``), and the pieces installed (after: an
        installed split hides the blocks from ``model.modules()``)."""
        with frozen_stats(self.model), self._split.installed():
            yield

    def _main_and_branches(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        drawn: list[tuple[Subnet, int]],
        same: list[int],
        terms: list,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        subnets = [drawn[j][0] for j in same]
        root = build_trie([*subnets, self._main_subnet])
        spine = [root]
        for key in [*run_path(self._main_subnet), ("head",)]:
            spine.append(spine[-1].children[key])
        # Sub-networks equal to the main network end at its head: no cut, one backward.
        main_index = len(subnets)
        at_main_head = [same[i] for i in spine[-1].subnets if i != main_index]
        cut_at = [node for node in spine[:-1] if len(node.children) > 1]
        cuts: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        with self._cut(cut_at, cuts):
            ce, teacher = self._main_forward_backward(images, labels, at_main_head, terms)
        # Deepest cut first: its segment's gradient is complete once its branches are done.
        for node in reversed(cut_at):
            out, leaf = cuts.pop(node.key)
            on_spine = spine[spine.index(node) + 1]
            for child in node.ordered_children():
                if child is not on_spine:
                    with self._sub_forwards():
                        self._run_subtree(child, leaf, teacher, labels, same, terms)
            torch.autograd.backward(out, leaf.grad)
            del out, leaf
        return ce, teacher

    @contextlib.contextmanager
    def _cut(self, nodes: list[TrieNode], cuts: dict) -> Iterator[None]:
        """Hooks that cut the main network's forward after each node: the forward goes on
        from a leaf copy of the activation, recorded with the output in ``cuts``."""

        def cut(key: tuple, output: torch.Tensor) -> torch.Tensor:
            leaf = output.detach().requires_grad_()
            cuts[key] = (output, leaf)
            return leaf

        handles = []
        try:
            for node in nodes:
                if node.key == ("stem",):  # before the first stage: its input is the stem's
                    container = self.stages[0].container

                    def pre(module: nn.Module, args: tuple, key=node.key) -> tuple:
                        return (cut(key, args[0]), *args[1:])

                    handles.append(container.register_forward_pre_hook(pre))
                else:

                    def post(module: nn.Module, args: tuple, output, key=node.key):
                        return cut(key, output)

                    handles.append(self._split.block(node.key).register_forward_hook(post))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _run_subtree(
        self,
        node: TrieNode,
        x: torch.Tensor,
        teacher: torch.Tensor,
        labels: torch.Tensor,
        indices: list[int],
        terms: list,
    ) -> None:
        """Run ``node`` and everything below it from ``x`` (the node's input), backpropagate
        each head's loss terms into ``x``; ``indices`` maps the trie's sub-networks to the
        step's. A node with several children is cut like the main network's forward."""
        split = self._split
        while not node.is_head:
            with self.precision.autocast():
                x = split.stem(x) if node.key == ("stem",) else split.block(node.key)(x)
            children = node.ordered_children()
            if len(children) > 1:
                leaf = x.detach().requires_grad_()
                for child in children:
                    self._run_subtree(child, leaf, teacher, labels, indices, terms)
                torch.autograd.backward(x, leaf.grad)
                return
            node = children[0]
        with self.precision.autocast():
            sub_logits = split.head(x).float()
        loss = 0.0
        for i in node.subnets:
            term = self._term(sub_logits, teacher, labels)
            terms[indices[i]] = term.detach()
            loss = loss + self.lam * term
        self.precision.backward(loss)

    def summary_extras(self, summary: dict[str, Any]) -> dict[str, Any]:
        return {"st_shared_prefix": self.shared_prefix} if self.shared_prefix else {}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])


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
