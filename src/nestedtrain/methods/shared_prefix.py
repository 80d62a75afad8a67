"""The shared-prefix ST step's machinery: whether it applies, and running a trie of
sub-networks so that each shared block's forward and backward runs once.

An ordered sub-network on the main network's input computes exactly what the main network
computes up to the first block where they differ (train-mode BN normalises by the batch). The
sub-networks of a step and the main network form a trie (:func:`nestedtrain.elastic.trie.
build_trie`); :class:`PrefixSharing` cuts the main network's forward where sub-networks branch
off, runs each branch from a leaf copy of the activation and backpropagates it there, then the
segment above the cut once with the summed gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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

__all__ = ["PrefixSharing", "decide_prefix_sharing"]

# term(sub_logits, teacher, labels) -> a sub-network's loss term (before λ)
Term = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def decide_prefix_sharing(
    model: nn.Module, stages: list[Stage], images: torch.Tensor, why_not: str | None
) -> tuple[ModelSplit | None, str]:
    """The model split into pieces when prefix sharing applies to it, and the status to report
    (``on: ...`` or ``off: <why>``). ``why_not``: a reason the method's options already give.

    Under DDP every rank takes the same path (the shared one all-reduces gradients by hand,
    the plain one in DDP's backward; ranks on different paths would hang).

    A model that draws random numbers in train mode (dropout, drop-path) shares too: a
    sub-network then runs the shared prefix with the main network's masks, and draws its own
    in the blocks after it (the plain step draws fresh masks for the whole sub-network). Both
    are stochastic depth on top of ST; they differ only in which masks the sub-network sees.
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


class PrefixSharing:
    """Runs sub-networks of a trie from a shared activation, backpropagating into it.

    Args:
        model: the main network (DDP-wrapped or not); its pieces come from ``split``.
        split: the model's pieces.
        stages: the model's stages.
        precision: autocast and backward scaling.
        term: a sub-network's loss term; ``lam`` weighs each.
    """

    def __init__(
        self,
        model: nn.Module,
        split: ModelSplit,
        stages: list[Stage],
        precision: Precision,
        term: Term,
        lam: float,
    ):
        self.model, self.split, self.stages = model, split, stages
        self.precision, self.term, self.lam = precision, term, lam
        self.main_subnet = Subnet(tuple(range(len(stage))) for stage in stages)

    @contextlib.contextmanager
    def sub_forwards(self) -> Iterator[None]:
        """BN statistics left alone, and the pieces installed (after: an installed split
        hides the blocks from ``model.modules()``)."""
        with frozen_stats(self.model), self.split.installed():
            yield

    def main_and_branches(
        self,
        main_step: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]],
        subnets: list[Subnet],
        labels: torch.Tensor,
        indices: list[int],
        terms: list,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The main network's step (``main_step(trie indices of sub-networks equal to it)``
        returns its CE and teacher logits) with the sub-networks ``subnets`` (on the main
        network's input) branching off it; their terms go to ``terms[indices[i]]``."""
        root = build_trie([*subnets, self.main_subnet])
        spine = [root]
        for key in [*run_path(self.main_subnet), HEAD]:
            spine.append(spine[-1].children[key])
        # Sub-networks equal to the main network end at its head: no cut, one backward.
        at_main_head = [indices[i] for i in spine[-1].subnets if i != len(subnets)]
        cut_at = [node for node in spine[:-1] if len(node.children) > 1]
        cuts: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        with self._cut(cut_at, cuts):
            ce, teacher = main_step(at_main_head)
        # Deepest cut first: its segment's gradient is complete once its branches are done.
        for node in reversed(cut_at):
            out, leaf = cuts.pop(node.key)
            on_spine = spine[spine.index(node) + 1]
            for child in node.ordered_children():
                if child is not on_spine:
                    with self.sub_forwards():
                        self.run_subtree(child, leaf, teacher, labels, indices, terms)
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

    def run_subtree(
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
        step's. A node with several children is cut like the main network's forward: its
        children run from a leaf copy of its output, then the node backpropagates once."""
        split = self.split

        def run(node: TrieNode, x: torch.Tensor) -> torch.Tensor | None:
            if not node.is_head:
                with self.precision.autocast():
                    return split.stem(x) if node.key.is_stem else split.block(node.key)(x)
            with self.precision.autocast():
                sub_logits = split.head(x).float()
            loss = 0.0
            for i in node.subnets:
                term = self.term(sub_logits, teacher, labels)
                terms[indices[i]] = term.detach()
                loss = loss + self.lam * term
            self.precision.backward(loss)
            return None

        def fork(output: torch.Tensor) -> torch.Tensor:
            return output.detach().requires_grad_()

        def join(output: torch.Tensor, leaf: torch.Tensor) -> None:
            torch.autograd.backward(output, leaf.grad)

        walk_trie(node, [x], run, fork, join)
