"""A model run piece by piece: stem, one block at a time, head.

The walks of a trie of sub-networks (:mod:`nestedtrain.elastic.trie`) run its pieces with a
:class:`ModelSplit`.

The stem and the head are whatever the model's forward does before its first stage and after
its last: a pre-hook on the first stage container stops a forward after the stem, and the
head runs as the model's forward with every stage container emptied and the last one's output
replaced by the given features. A model whose stages this cannot split (stage containers that
are not called, or called more than once, code between stages) raises :class:`SplitError`;
callers then run sub-networks whole, with :func:`~nestedtrain.elastic.use_subnet`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..modes import eval_mode
from .stages import Stage, unwrap
from .subnet import swapped_blocks
from .trie import HEAD, STEM, Key

__all__ = ["ModelSplit", "SplitError", "bytes_per_image"]


class SplitError(Exception):
    """The model's forward cannot be split into stem, blocks and head."""


class _StemDone(Exception):
    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output


def bytes_per_image(x: torch.Tensor) -> int:
    """Bytes of one image of the batch ``x`` (its first), in ``x``'s dtype."""
    return x[0].numel() * x.element_size()


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


# ---------------------------------------------------------------------------- the model
class ModelSplit:
    """Runs a model piece by piece: ``stem(x)``, ``block(key)(x)``, ``head(features)``.

    Construction runs the model once on ``probe`` in eval mode, without grad: it finds the BN
    layers outside the stages that run before them (``stem_bns``) and after them
    (``head_bns``), checks that stem, blocks and head reproduce the model's output, and
    records how many bytes per image each piece's output takes (``bytes_per_image``, by
    key). It draws no random numbers and changes no BN statistics.

    Use :meth:`stem` and :meth:`head` inside :meth:`installed`, which empties every stage
    container (blocks are called directly) and installs the hooks. Both work in train and
    eval mode and with autograd: a head's gradient flows into the features it was given.

    Args:
        model: the model (a DDP wrapper is looked through).
        stages: ``find_stages(model)``.
        probe: a batch of real inputs; its first image is kept for head forwards.

    Raises:
        SplitError: the forward cannot be split this way.
    """

    def __init__(self, model: nn.Module, stages: Sequence[Stage], probe: torch.Tensor):
        self.model = unwrap(model)
        self.stages = list(stages)
        # A copy: a view would keep the whole batch it came from alive.
        self.probe = probe[:1].detach().clone()
        self.probe_numel = probe[0].numel()
        self.bytes_per_image: dict[Key, int] = {}
        self._mode = "off"
        self._features: torch.Tensor | None = None
        self.stem_bns: list[_BatchNorm] = []
        self.head_bns: list[_BatchNorm] = []
        self._classify(probe)

    def block(self, key: Key) -> nn.Module:
        """The block module of a block's key (``Key("block", s, b)``, or the plain tuple)."""
        _, stage, block = key
        return self.stages[stage].blocks[block]

    # ---------------------------------------------------------------------- discovery
    @torch.no_grad()
    def _classify(self, probe: torch.Tensor) -> None:
        """Find which BNs outside the stages run before them (stem) and after them (head).

        Also checks that each stage container is called once, in order, on the previous
        stage's output (nothing runs between stages), else raises ``SplitError``.
        """
        inside = {id(m) for stage in self.stages for b in stage.blocks for m in b.modules()}
        inside |= {id(stage.container) for stage in self.stages}
        # The BNs that keep running statistics, as ``nestedtrain.bn.batchnorms`` finds them
        # (that module sits a layer above this one: it runs sub-networks).
        outside = [
            m
            for m in self.model.modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats and id(m) not in inside
        ]
        phase = {"now": "stem"}
        seen: dict[int, str] = {}
        calls: list[tuple[int, str, torch.Tensor | None]] = []
        handles = []

        def bn_hook(module: nn.Module, inputs: tuple) -> None:
            seen.setdefault(id(module), phase["now"])

        def stage_pre(s: int) -> Callable:
            def hook(module: nn.Module, inputs: tuple) -> None:
                phase["now"] = "stages"
                calls.append((s, "in", _first_tensor(inputs)))

            return hook

        def stage_post(s: int) -> Callable:
            def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
                calls.append((s, "out", _first_tensor(output)))
                if s == len(self.stages) - 1:
                    phase["now"] = "head"

            return hook

        try:
            for m in outside:
                handles.append(m.register_forward_pre_hook(bn_hook))
            for s, stage in enumerate(self.stages):
                handles.append(stage.container.register_forward_pre_hook(stage_pre(s)))
                handles.append(stage.container.register_forward_hook(stage_post(s)))
            with eval_mode(self.model):
                reference = self.model(probe)
        finally:
            for handle in handles:
                handle.remove()
        expected = [(s, io) for s in range(len(self.stages)) for io in ("in", "out")]
        if [(s, io) for s, io, _ in calls] != expected or any(t is None for *_, t in calls):
            raise SplitError("stage containers are not each called once, in order")
        for s in range(1, len(self.stages)):
            if calls[2 * s][2] is not calls[2 * s - 1][2]:
                raise SplitError(f"something runs between stage {s} and stage {s + 1}")
        if any(phase_of == "stages" for phase_of in seen.values()):
            raise SplitError("a BN outside the stage blocks runs between stages")
        self.stem_bns = [m for m in outside if seen.get(id(m)) == "stem"]
        self.head_bns = [m for m in outside if seen.get(id(m)) == "head"]
        self._check(probe, reference)

    @torch.no_grad()
    def _check(self, probe: torch.Tensor, reference: torch.Tensor) -> None:
        """The pieces must compute what the model's own forward computes.

        Also records how many bytes per image each piece's output takes. A skippable block
        keeps its input's shape, so a block's output has the same size in every sub-network
        that runs it.
        """
        sizes = self.bytes_per_image
        # eval_mode before installed(): an installed split hides the blocks from modules().
        with eval_mode(self.model), self.installed():
            x = self.stem(probe)
            sizes[STEM] = bytes_per_image(x)
            for s, stage in enumerate(self.stages):
                for b, block in enumerate(stage.blocks):
                    x = block(x)
                    if not isinstance(x, torch.Tensor):
                        raise SplitError(f"block {b} of stage {s} returns no tensor")
                    sizes[Key("block", s, b)] = bytes_per_image(x)
            logits = self.head(x)
            sizes[HEAD] = bytes_per_image(logits)
        if not isinstance(reference, torch.Tensor) or logits.shape != reference.shape:
            raise SplitError("the head does not return the model's logits")
        if not torch.allclose(logits.float(), reference.float(), rtol=1e-4, atol=1e-5):
            raise SplitError("stem, blocks and head do not reproduce the model's output")

    # ------------------------------------------------------------------------ running
    @contextmanager
    def installed(self) -> Iterator[ModelSplit]:
        """Empty every stage container and install the stem/head hooks (restored on exit)."""
        first, last = self.stages[0].container, self.stages[-1].container
        handles = []

        def stop_after_stem(module: nn.Module, inputs: tuple) -> None:
            if self._mode == "stem":
                raise _StemDone(_first_tensor(inputs))

        def swap_in_features(module: nn.Module, inputs: tuple, output: Any) -> Any:
            if self._mode == "head":
                return self._features
            return None

        try:
            handles.append(first.register_forward_pre_hook(stop_after_stem))
            handles.append(last.register_forward_hook(swap_in_features))
            # Empty stages: the caller runs the blocks itself, between stem and head.
            with swapped_blocks(self.stages, [()] * len(self.stages)):
                yield self
        finally:
            for handle in handles:
                handle.remove()
            self._mode, self._features = "off", None

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        """The model's forward up to its first stage (inside :meth:`installed`)."""
        self._mode = "stem"
        try:
            self.model(images)
        except _StemDone as done:
            return done.output
        finally:
            self._mode = "off"
        raise SplitError("the forward never reached the first stage")

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """The model's forward after its last stage, on ``features`` (inside
        :meth:`installed`).

        The forward runs the stem on the kept probe image and throws its output away; the
        stem's BNs run in eval mode meanwhile so that they neither learn from it nor
        normalise one image by its own statistics.
        """
        training = [m.training for m in self.stem_bns]
        for m in self.stem_bns:
            m.eval()
        self._mode, self._features = "head", features
        try:
            return self.model(self.probe)
        finally:
            self._mode, self._features = "off", None
            for m, was in zip(self.stem_bns, training):
                m.train(was)
