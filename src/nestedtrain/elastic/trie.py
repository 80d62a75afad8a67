"""The trie of sub-networks' run paths, and the one walk that runs it.

A sub-network runs stem -> its kept blocks in run order -> head. Two sub-networks (or a
sub-network and the main network) on the same input compute the same thing up to the first
block where their paths differ, so the paths of several sub-networks form a trie
(:func:`build_trie`) whose nodes need computing once for everything below them.
:func:`walk_trie` runs a subtree depth first; the shared-prefix evaluator (BN calibration and
evaluation, :mod:`nestedtrain.evaluation.passes`) and the shared-prefix ST step
(:mod:`nestedtrain.methods.shared_prefix`) differ only in what running a piece means.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .subnet import Subnet

__all__ = ["HEAD", "STEM", "Key", "TrieNode", "build_trie", "run_path", "walk_trie"]


class Key(NamedTuple):
    """A piece of a run: the stem, block ``block`` of stage ``stage``, or the head."""

    kind: str  # "stem", "block" or "head"
    stage: int = -1
    block: int = -1

    @property
    def is_stem(self) -> bool:
        return self.kind == "stem"

    @property
    def is_block(self) -> bool:
        return self.kind == "block"

    @property
    def is_head(self) -> bool:
        return self.kind == "head"


STEM = Key("stem")
HEAD = Key("head")


def run_path(subnet: Subnet) -> list[Key]:
    """The blocks ``subnet`` runs, in order, as trie keys (without stem and head)."""
    return [Key("block", s, b) for s, kept in enumerate(subnet.blocks) for b in kept]


@dataclass(eq=False)
class TrieNode:
    """One piece of a run: the stem (the root), a block, or the head (a leaf).

    ``subnets`` holds, at a head, the indices of the sub-networks that end there (equal
    sub-networks share one head); ``size`` counts the nodes of the subtree.
    """

    key: Key
    children: dict[Key, TrieNode] = field(default_factory=dict)
    subnets: list[int] = field(default_factory=list)
    size: int = 1

    @property
    def is_head(self) -> bool:
        return self.key.is_head

    def ordered_children(self) -> list[TrieNode]:
        """Children, the one that continues this node's stage last: its subtree is the
        deepest, so a walk can drop this node's output before running it."""
        stage = self.key.stage if self.key.is_block else -1

        def order(child: TrieNode) -> tuple:
            return (child.key.is_block and child.key.stage == stage, child.size)

        return sorted(self.children.values(), key=order)


def build_trie(subnets: Sequence[Subnet], node: type[TrieNode] = TrieNode) -> TrieNode:
    """The trie of the run paths of ``subnets``; ``node`` may be a subclass carrying more."""
    root = node(STEM)
    for index, subnet in enumerate(subnets):
        current = root
        for key in [*run_path(subnet), HEAD]:
            if key not in current.children:
                current.children[key] = node(key)
            current = current.children[key]
        current.subnets.append(index)

    def count(current: TrieNode) -> int:
        current.size = 1 + sum(count(child) for child in current.children.values())
        return current.size

    count(root)
    return root


# run(node, its input) -> its output (a head's is not used)
Run = Callable[[TrieNode, Any], Any]


def walk_trie(
    node: TrieNode,
    holder: list,
    run: Run,
    fork: Callable[[Any], Any] | None = None,
    join: Callable[[Any, Any], None] | None = None,
) -> None:
    """Run ``node`` and its subtree, depth first, children in :meth:`TrieNode.
    ordered_children` order.

    ``holder`` is a one-element list holding ``node``'s input; the walk takes it over, and no
    frame of the walk keeps an output while the subtree below it runs: a node's last child
    gets the only reference left, so memory holds about one output per stage being walked.

    At a node with several children, ``fork(output)`` (when given) makes what the children
    get instead (e.g. a leaf tensor to backpropagate into), and ``join(output, forked)`` runs
    once they are done (e.g. the backward of the segment above).
    """
    outputs = [run(node, holder.pop())]
    if node.is_head:
        return
    children = node.ordered_children()
    if fork is not None and len(children) > 1:
        output = outputs.pop()
        forked = fork(output)
        for child in children:
            walk_trie(child, [forked], run, fork, join)
        join(output, forked)
        return
    for i, child in enumerate(children):
        if i == len(children) - 1:
            last = [outputs.pop()]
            walk_trie(child, last, run, fork, join)
        else:
            walk_trie(child, [outputs[0]], run, fork, join)
