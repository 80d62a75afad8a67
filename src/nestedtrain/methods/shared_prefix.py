"""The shared-prefix runner: the ST step's networks run so that each block they share is
computed, and backpropagated, once.

An ordered sub-network on the main network's input computes exactly what the main network
computes up to the first block where they differ (train-mode BN normalises by the batch). The
step's sub-networks and the main network form a trie of run paths
(:func:`nestedtrain.elastic.trie.build_trie`); :class:`SharedPrefixRunner` cuts the main
network's forward where sub-networks branch off, runs each branch from a leaf copy of the
activation and backpropagates it there, then the segment above the cut once with the summed
gradient. :func:`decide_shared_prefix` says whether a model allows it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..bn import frozen_stats
from ..distributed import all_ranks
from ..elastic.split import ModelSplit, SplitError
from ..elastic.stages import Stage
from ..elastic.subnet import Subnet
from ..elastic.trie import HEAD, TrieNode, build_trie, run_path, walk_trie
from .base import Precision
from .runners import (
    Drawn,
    StepLoss,
    all_reduce_gradients,
    local_gradients,
    main_backward,
    resized,
    whole_backward,
)

__all__ = ["SharedPrefixRunner", "decide_shared_prefix"]


def decide_shared_prefix(
    model: nn.Module, stages: list[Stage], images: torch.Tensor, why_not: str | None
) -> tuple[ModelSplit | None, str]:
    """The model split into pieces when the shared prefix applies to it, and the status to
    report (``on: ...`` or ``off: <why>``). ``why_not``: a reason the method's options
    already give.

    Under DDP every rank takes the same path (the shared one all-reduces gradients by hand,
    the plain one in DDP's backward; ranks on different paths would hang).

    A model that draws random numbers in train mode (dropout, drop-path) shares too: a
    sub-network then runs the shared prefix with the main network's masks, and draws its own
    in the blocks after it (the plain runner draws fresh masks for the whole sub-network).
    Both are stochastic depth on top of ST; they differ only in which masks the sub-network
    sees.
    """
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    split, reason = None, why_not
    if reason is None:
        try:
            split = ModelSplit(module, stages, images[:2])
        except SplitError as err:
            reason = f"the model's forward cannot be split into stem, blocks and head ({err})"
    if isinstance(model, nn.parallel.DistributedDataParallel):
        everywhere = all_ranks(reason is None, model.process_group, images.device)
        if reason is None and not everywhere:
            split, reason = None, "it does not apply on another rank"
    if reason is not None:
        return None, f"off: {reason}"
    return split, "on: sub-networks that see the same input compute shared blocks once"


class SharedPrefixRunner:
    """The plain runner's losses and gradients, computing every shared prefix once.

    The sub-networks that see the main network's input branch off the main network's
    forward. Held at any time: the main network's activations up to the cut, and one
    sub-network's rest. Sub-networks that see another size share prefixes among themselves,
    per size. Under DDP every backward accumulates locally and the gradients are all-reduced
    once, at the end.

    Args:
        model: the main network (DDP-wrapped or not); its pieces come from ``split``.
        split: the model's pieces (:func:`decide_shared_prefix`).
        stages: the model's stages.
        precision: autocast and backward scaling.
    """

    def __init__(
        self, model: nn.Module, split: ModelSplit, stages: list[Stage], precision: Precision
    ):
        self.model, self.split, self.stages, self.precision = model, split, stages, precision
        self.main_subnet = Subnet(tuple(range(len(stage))) for stage in stages)

    def run(
        self, images: torch.Tensor, labels: torch.Tensor, drawn: Sequence[Drawn], loss: StepLoss
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Backpropagate ``loss`` for the main network and the ``drawn`` sub-networks;
        returns the detached CE and the terms, stacked in draw order."""
        crop = images.shape[-1]
        same = [j for j, (_, side) in enumerate(drawn) if side == crop]
        others: dict[int, list[int]] = {}
        for j, (_, side) in enumerate(drawn):
            if side != crop:
                others.setdefault(side, []).append(j)
        with local_gradients(self.model):
            ce, teacher, terms = self._main_and_branches(images, labels, drawn, same, loss)
            for side, group in others.items():
                inputs = resized(images, side)
                terms |= self._among_themselves(inputs, labels, drawn, group, teacher, loss)
        all_reduce_gradients(self.model)
        return ce, torch.stack([terms[j] for j in range(len(drawn))])

    def _main_and_branches(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        drawn: Sequence[Drawn],
        same: list[int],
        loss: StepLoss,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """The main network's forward and backward with the drawn sub-networks ``same`` (on
        its input) branching off it; the detached CE, the teacher and their terms by index."""
        root = build_trie([*(drawn[j].subnet for j in same), self.main_subnet])
        spine = [root]
        for key in [*run_path(self.main_subnet), HEAD]:
            spine.append(spine[-1].children[key])
        # Sub-networks equal to the main network end at its head: no cut, one backward.
        at_head = [same[i] for i in spine[-1].subnets if i != len(same)]
        cut_at = [node for node in spine[:-1] if len(node.children) > 1]
        cuts: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        with self._cut(cut_at, cuts):
            ce, teacher, head_terms = main_backward(
                self.model, self.precision, images, labels, loss, len(at_head)
            )
        terms = dict(zip(at_head, head_terms))
        # Deepest cut first: its segment's gradient is complete once its branches are done.
        for node in reversed(cut_at):
            out, leaf = cuts.pop(node.key)
            on_spine = spine[spine.index(node) + 1]
            for child in node.ordered_children():
                if child is not on_spine:
                    with self._sub_forwards():
                        terms |= self._subtree(child, leaf, teacher, labels, same, loss)
            torch.autograd.backward(out, leaf.grad)
            del out, leaf
        return ce, teacher, terms

    def _among_themselves(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        drawn: Sequence[Drawn],
        group: list[int],
        teacher: torch.Tensor,
        loss: StepLoss,
    ) -> dict[int, torch.Tensor]:
        """The drawn sub-networks ``group``, which all see ``inputs`` (another size than
        the main network's): their terms by index."""
        if len(group) == 1:  # nothing to share
            j = group[0]
            subnet = drawn[j].subnet
            model, stages, precision = self.model, self.stages, self.precision
            return {
                j: whole_backward(model, stages, precision, subnet, inputs, teacher, labels, loss)
            }
        root = build_trie([drawn[j].subnet for j in group])
        with self._sub_forwards():
            return self._subtree(root, inputs, teacher, labels, group, loss)

    @contextlib.contextmanager
    def _sub_forwards(self) -> Iterator[None]:
        """BN statistics left alone, and the pieces installed (after: an installed split
        hides the blocks from ``model.modules()``)."""
        with frozen_stats(self.model), self.split.installed():
            yield

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
                if node.key.is_stem:  # before the first stage: its input is the stem's
                    container = self.stages[0].container

                    def pre(module: nn.Module, args: tuple, key=node.key) -> tuple:
                        return (cut(key, args[0]), *args[1:])

                    handles.append(container.register_forward_pre_hook(pre))
                else:

                    def post(module: nn.Module, args: tuple, output: Any, key=node.key):
                        return cut(key, output)

                    handles.append(self.split.block(node.key).register_forward_hook(post))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _subtree(
        self,
        node: TrieNode,
        x: torch.Tensor,
        teacher: torch.Tensor,
        labels: torch.Tensor,
        indices: list[int],
        loss: StepLoss,
    ) -> dict[int, torch.Tensor]:
        """Run ``node`` and everything below it from ``x`` (the node's input), backpropagate
        each head's terms into ``x``; returns the terms by draw index (``indices`` maps the
        trie's sub-networks to the draw's). A node with several children is cut like the
        main network's forward: its children run from a leaf copy of its output, then the
        node backpropagates once."""
        split, terms = self.split, {}

        def run(node: TrieNode, x: torch.Tensor) -> torch.Tensor | None:
            if not node.is_head:
                with self.precision.autocast():
                    return split.stem(x) if node.key.is_stem else split.block(node.key)(x)
            with self.precision.autocast():
                sub_logits = split.head(x).float()
            total = 0.0
            for i in node.subnets:
                term = loss.term(sub_logits, teacher, labels)
                terms[indices[i]] = term.detach()
                total = total + loss.lam * term
            self.precision.backward(total)
            return None

        def fork(output: torch.Tensor) -> torch.Tensor:
            return output.detach().requires_grad_()

        def join(output: torch.Tensor, leaf: torch.Tensor) -> None:
            torch.autograd.backward(output, leaf.grad)

        walk_trie(node, [x], run, fork, join)
        return terms
