"""Every sub-network of a model, evaluated fast by sharing the computation of common prefixes.

A sub-network runs stem -> its blocks in run order -> head. Many sub-networks share a prefix
(all of them the stem; ordered depths ``d`` and ``d+1`` of a stage its first ``d`` blocks), so
their blocks form a trie, and each trie node is computed once for all the sub-networks below it:

- **BN re-calibration.** ``bn.recalibrate`` estimates a BN's statistics cumulatively over the
  calibration batches, in train mode, where a block's input is the train-mode output of the
  blocks before it. That input depends only on the prefix, so each node re-estimates its own
  block's BNs once from its parent's calibration activations, with the same batches, order and
  ``n / (seen + n)`` weighting, and keeps them for every sub-network below it.
- **Evaluation.** Each node runs its block, in eval mode with its own statistics, on its
  parent's activations of the evaluation images; each leaf runs the head.

The result equals one-at-a-time evaluation (:func:`nestedtrain.engine.evaluate.evaluate_subnets`)
exactly, as long as train mode draws no random numbers (no dropout or drop-path before a BN).
Children that continue the same stage are visited last, and a node's activations are released
before its last child runs, so memory holds about one set of activations per stage.

**Memory.** Both passes run on chunks of consecutive batches, the calibration images first,
then the evaluation images. A node puts its BN statistics and its count of images seen away
between chunks (train-mode BN outputs do not depend on them), so chunking changes nothing in
the result. Chunks are sized from a budget (``memory_mb``) and from the activation sizes the
model produced on a probe image, so memory does not grow with the number of images (ResNet-50
at 224 px holds at most 6.7 MiB an image, its activations and the image itself: the default
1024 MiB runs chunks of 152 images, whichever of its sub-networks are evaluated).

The stem and the head are whatever the model's forward does before its first stage and after
its last: a pre-hook on the first stage container stops the forward after the stem, and the
head runs as the model's forward with every stage container emptied and the last one's output
replaced by the cached activation. A model whose stages this cannot split (stage containers
that are not called, code between stages) is evaluated one sub-network at a time instead.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import bn as bn_tools
from ..elastic.sampling import OrderedSampler
from ..elastic.stages import Stage, find_stages, unwrap
from ..elastic.subnet import Subnet, export_subnet, swapped_blocks, use_subnet
from ..engine.evaluate import batch_counts, evaluate, metrics_from_counts

__all__ = [
    "DEFAULT_MEMORY_MB",
    "evaluate_space",
    "evaluate_subnets_shared",
    "match_subnet",
    "space_subnets",
    "subnet_logits",
    "subnet_stats",
]

EvalBatches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
CalibBatches = Callable[[], Iterable[Union[torch.Tensor, Sequence[torch.Tensor]]]]
# consume(subnet indices, batch index, logits, labels): called once per leaf and eval batch.
Consumer = Callable[[list[int], int, torch.Tensor, torch.Tensor], None]
# consume_main(batch index, logits, labels): the main network's logits, once per eval batch.
MainConsumer = Callable[[int, torch.Tensor, torch.Tensor], None]

# MiB of activations a shared-prefix evaluation caches at once, unless told otherwise.
DEFAULT_MEMORY_MB = 1024


# ------------------------------------------------------------------------------ the trie
@dataclass
class _Node:
    """One step of a run: the stem (root), a block ``(stage, index)``, or the head (leaf)."""

    key: tuple
    children: dict[tuple, _Node] = field(default_factory=dict)
    subnets: list[int] = field(default_factory=list)  # at a head: indices of its sub-networks
    stats: dict[int, tuple[torch.Tensor, ...]] | None = None  # its BNs after re-calibration
    seen: int = 0  # calibration images its BNs have seen so far
    size: int = 1

    def ordered_children(self) -> list[_Node]:
        # The child that continues this node's stage goes last: its subtree is the deepest,
        # and the parent's activations are dropped before it runs.
        stage = self.key[1] if self.key[0] == "block" else -1

        def order(child: _Node) -> tuple:
            return (child.key[0] == "block" and child.key[1] == stage, child.size)

        return sorted(self.children.values(), key=order)


def _build_trie(subnets: Sequence[Subnet]) -> _Node:
    root = _Node(("stem",))
    for index, subnet in enumerate(subnets):
        node = root
        path = [("block", s, b) for s, kept in enumerate(subnet.blocks) for b in kept]
        for key in [*path, ("head",)]:
            node = node.children.setdefault(key, _Node(key))
        node.subnets.append(index)

    def count(node: _Node) -> int:
        node.size = 1 + sum(count(child) for child in node.children.values())
        return node.size

    count(root)
    return root


# ---------------------------------------------------------------------------- the model
class _SplitFailed(Exception):
    """The model's forward cannot be split into stem, blocks and head."""


class _StemDone(Exception):
    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output


def _bytes_per_image(x: torch.Tensor) -> int:
    return x[0].numel() * x.element_size()


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


class _Split:
    """Runs a model piece by piece: ``stem(x)``, ``block(x)``, ``head(features)``.

    Inside :meth:`installed` every stage container is emptied (blocks are called directly),
    the first stage's pre-hook stops a stem forward, and the last stage's hook swaps in the
    features for a head forward.
    """

    def __init__(self, model: nn.Module, stages: Sequence[Stage], probe: torch.Tensor):
        self.model = model
        self.stages = list(stages)
        # A copy: a view would keep the whole batch it came from alive.
        self.probe = probe[:1].clone()
        self.probe_numel = probe[0].numel()
        # Bytes per probe image of each piece's output: ("stem",), ("block", s, b), ("head",).
        self.bytes_per_image: dict[tuple, int] = {}
        self._mode = "off"
        self._features: torch.Tensor | None = None
        self.stem_bns: list[_BatchNorm] = []
        self.head_bns: list[_BatchNorm] = []
        self._classify(probe)

    # ---------------------------------------------------------------------- discovery
    @torch.no_grad()
    def _classify(self, probe: torch.Tensor) -> None:
        """Find which BNs outside the stages run before them (stem) and after them (head).

        Also checks that each stage container is called once, in order, on the previous
        stage's output (nothing runs between stages), else raises ``_SplitFailed``.
        """
        inside = {id(m) for stage in self.stages for b in stage.blocks for m in b.modules()}
        inside |= {id(stage.container) for stage in self.stages}
        outside = [m for m in bn_tools.batchnorms(self.model) if id(m) not in inside]
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
            was_training = self.model.training
            self.model.eval()
            try:
                reference = self.model(probe)
            finally:
                self.model.train(was_training)
        finally:
            for handle in handles:
                handle.remove()
        expected = [(s, io) for s in range(len(self.stages)) for io in ("in", "out")]
        if [(s, io) for s, io, _ in calls] != expected or any(t is None for *_, t in calls):
            raise _SplitFailed("stage containers are not each called once, in order")
        for s in range(1, len(self.stages)):
            if calls[2 * s][2] is not calls[2 * s - 1][2]:
                raise _SplitFailed(f"something runs between stage {s} and stage {s + 1}")
        if any(phase_of == "stages" for phase_of in seen.values()):
            raise _SplitFailed("a BN outside the stage blocks runs between stages")
        self.stem_bns = [m for m in outside if seen.get(id(m)) == "stem"]
        self.head_bns = [m for m in outside if seen.get(id(m)) == "head"]
        self._check(probe, reference)

    def _check(self, probe: torch.Tensor, reference: torch.Tensor) -> None:
        """The pieces must compute what the model's own forward computes.

        Also records how many bytes per image each piece's output takes, for the memory
        budget. A skippable block keeps its input's shape, so a block's output has the same
        size in every sub-network that runs it.
        """
        was_training = self.model.training
        sizes = self.bytes_per_image
        try:
            with self.installed():
                self.set_mode(False)
                x = self.stem(probe)
                sizes["stem",] = _bytes_per_image(x)
                for s, stage in enumerate(self.stages):
                    for b, block in enumerate(stage.blocks):
                        x = block(x)
                        sizes["block", s, b] = _bytes_per_image(x)
                logits = self.head(x)
                sizes["head",] = _bytes_per_image(logits)
        finally:
            self.model.train(was_training)
        if not isinstance(reference, torch.Tensor) or logits.shape != reference.shape:
            raise _SplitFailed("the head does not return the model's logits")
        if not torch.allclose(logits.float(), reference.float(), rtol=1e-4, atol=1e-5):
            raise _SplitFailed("stem, blocks and head do not reproduce the model's output")

    # ------------------------------------------------------------------------ running
    @contextmanager
    def installed(self):
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
            # Empty stages: the runner calls the blocks itself, between stem and head.
            with swapped_blocks(self.stages, [()] * len(self.stages)):
                yield self
        finally:
            for handle in handles:
                handle.remove()
            self._mode, self._features = "off", None

    def set_mode(self, training: bool) -> None:
        """Calibration mode (only BN trains, as in ``bn.recalibrate``) or eval mode for the
        whole model, the emptied stages' blocks included."""
        set_one = bn_tools.calibration_mode if training else nn.Module.eval
        set_one(self.model)
        for stage in self.stages:
            for block in stage.blocks:
                set_one(block)

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        self._mode = "stem"
        try:
            self.model(images)
        except _StemDone as done:
            return done.output
        finally:
            self._mode = "off"
        raise _SplitFailed("the forward never reached the first stage")

    def head(self, features: torch.Tensor) -> torch.Tensor:
        # The stem runs on one probe image and its output is thrown away; its BNs must not
        # learn from it, so they run in eval mode here.
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


# ------------------------------------------------------------------------------ engine
def _images(batch: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    return batch if isinstance(batch, torch.Tensor) else batch[0]


def _block_bns(block: nn.Module) -> list[_BatchNorm]:
    return bn_tools.batchnorms(block)


_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _save(layers: Sequence[_BatchNorm]) -> dict[int, tuple[torch.Tensor | None, ...]]:
    return {
        id(m): tuple(
            None if getattr(m, key) is None else getattr(m, key).clone() for key in _BUFFERS
        )
        for m in layers
    }


def _load(layers: Sequence[_BatchNorm], stats: dict[int, tuple[torch.Tensor | None, ...]]) -> None:
    for m in layers:
        for key, value in zip(_BUFFERS, stats[id(m)]):
            if value is not None:
                getattr(m, key).copy_(value)


class _Runner:
    """Shared-prefix passes over a trie of sub-networks, one chunk of images at a time."""

    def __init__(self, split: _Split, root: _Node, stages: Sequence[Stage]):
        self.split, self.root, self.stages = split, root, stages
        self.held_per_image = self._held_per_image()

    # ------------------------------------------------------------------- memory budget
    def _held_per_image(self) -> int:
        """The most activation bytes per probe image that a pass holds at once.

        A pass keeps a node's outputs (for every image of the chunk) while its children run,
        except while its last child runs: that child drops them as soon as it has its own.
        So while node ``v`` computes, memory holds ``v``'s outputs, its inputs (its parent's
        outputs) and the outputs of every ancestor with a child still to run. Walking the
        trie in the order the pass runs gives the largest such sum exactly; for an ordered
        space it is about one stage's activations per stage plus the current block's.
        """
        sizes = self.split.bytes_per_image

        def peak(node: _Node, held: int, inputs: int, last: bool) -> int:
            out = sizes[node.key] if node.key[0] == "block" else 0  # a head's logits go at once
            kept = held if last else held + inputs
            children = node.ordered_children()
            return max(
                [held + inputs + out]
                + [peak(c, kept, out, i == len(children) - 1) for i, c in enumerate(children)]
            )

        stem = sizes["stem",]
        children = self.root.ordered_children()
        return max(
            [stem] + [peak(c, 0, stem, i == len(children) - 1) for i, c in enumerate(children)]
        )

    def images_per_chunk(self, images: torch.Tensor, budget: float | None, extra: int = 0) -> int:
        """How many images like ``images[0]`` a chunk may hold within ``budget`` bytes.

        Per image: the image itself (a chunk keeps its images until its pass ends), the
        activations :meth:`_held_per_image` counts, scaled from the probe to this image's
        number of pixels (convolutions and token sequences grow with the pixels), and
        ``extra`` bytes the caller keeps per image. The model, the BN statistics of the nodes
        and the temporaries inside one block's forward of one batch come on top.
        """
        if budget is None:
            return 0
        per_image = _bytes_per_image(images) + extra
        per_image += self.held_per_image * images[0].numel() / self.split.probe_numel
        return max(1, int(budget // per_image))

    # ---------------------------------------------------------------- calibration pass
    def _calibrated(
        self, node: _Node, layers: Sequence[_BatchNorm], inputs: list[torch.Tensor], run: Callable
    ) -> list[torch.Tensor]:
        """``run`` over one chunk of calibration batches in train mode, re-estimating
        ``layers`` for ``node`` as ``bn.recalibrate`` does: reset before the first batch,
        then momentum ``n / (seen + n)`` per batch.

        Train-mode BN outputs do not depend on the running statistics, so the node's
        statistics and count can be put away between chunks and the result is the same as
        one pass over every batch.
        """
        if node.seen == 0:
            for m in layers:
                m.reset_running_stats()
        else:
            _load(layers, node.stats)
        outputs = []
        for x in inputs:
            n = x.shape[0]
            for m in layers:
                m.momentum = n / (node.seen + n)
            outputs.append(run(x))
            node.seen += n
        node.stats = _save(layers)
        return outputs

    def calibrate(self, batches: list[torch.Tensor]) -> None:
        """Run one chunk of calibration batches through the trie (in order, chunk after
        chunk: each node's statistics continue from the previous chunk's)."""
        split = self.split
        split.set_mode(True)
        holder = [self._calibrated(self.root, split.stem_bns, batches, split.stem)]
        self._calibrate_children(self.root, holder)

    def _calibrate_children(self, node: _Node, holder: list) -> None:
        outputs = holder.pop()
        children = node.ordered_children()
        for i, child in enumerate(children):
            if i == len(children) - 1:
                last = [outputs]
                del outputs
                self._calibrate(child, last)
            else:
                self._calibrate(child, [outputs])

    def _calibrate(self, node: _Node, holder: list) -> None:
        if node.key[0] == "head":
            inputs = holder.pop()
            if self.split.head_bns:
                self._calibrated(node, self.split.head_bns, inputs, self.split.head)
            return
        _, s, b = node.key
        block = self.stages[s].blocks[b]
        inputs = holder.pop()
        # Handed over in a list, never bound here: this frame lives while the subtree runs.
        outputs = [self._calibrated(node, _block_bns(block), inputs, block)]
        del inputs
        self._calibrate_children(node, outputs)

    # --------------------------------------------------------------------- eval pass
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]], first: int, consume):
        """Run the eval batches (numbered from ``first``) through the trie."""
        split = self.split
        split.set_mode(False)
        if self.root.stats is not None:
            _load(split.stem_bns, self.root.stats)
        labels = [y for _, y in batches]
        holder = [[split.stem(x) for x, _ in batches]]
        self._eval_children(self.root, holder, labels, first, consume)

    def _eval_children(self, node: _Node, holder: list, labels, first: int, consume) -> None:
        outputs = holder.pop()
        children = node.ordered_children()
        for i, child in enumerate(children):
            if i == len(children) - 1:
                last = [outputs]
                del outputs
                self._eval(child, last, labels, first, consume)
            else:
                self._eval(child, [outputs], labels, first, consume)

    def _eval(self, node: _Node, holder: list, labels, first: int, consume) -> None:
        inputs = holder.pop()
        if node.key[0] == "head":
            if node.stats is not None:
                _load(self.split.head_bns, node.stats)
            for t, x in enumerate(inputs):
                consume(node.subnets, first + t, self.split.head(x), labels[t])
            return
        _, s, b = node.key
        block = self.stages[s].blocks[b]
        if node.stats is not None:
            _load(_block_bns(block), node.stats)
        # Handed over in a list, never bound here: this frame lives while the subtree runs.
        outputs = [[block(x) for x in inputs]]
        del inputs
        self._eval_children(node, outputs, labels, first, consume)


def _chunks(batches: Iterable[Any], max_images: int) -> Iterator[list]:
    """Consecutive batches, at most ``max_images`` images a chunk but at least one batch
    (``max_images=0``: everything in one chunk)."""
    chunk, count = [], 0
    for batch in batches:
        n = _images(batch).shape[0]
        if chunk and max_images and count + n > max_images:
            yield chunk
            chunk, count = [], 0
        chunk.append(batch)
        count += n
    if chunk:
        yield chunk


def _peek(batches: Iterable[Any]) -> tuple[Any, Iterator[Any]]:
    """The first item (``None`` when there is none) and an iterator over all of them."""
    iterator = iter(batches)
    first = next(iterator, None)
    return first, (iterator if first is None else itertools.chain([first], iterator))


def _as_subnets(model: nn.Module, subnets: Sequence[Subnet | str]) -> list[Subnet]:
    return [Subnet.parse(model, s) if isinstance(s, str) else s for s in subnets]


@torch.no_grad()
def subnet_logits(
    model: nn.Module,
    subnets: Sequence[Subnet | str],
    eval_batches: EvalBatches,
    calib_batches: CalibBatches | None,
    consume: Consumer,
    chunk_images: int | None = None,
    memory_mb: float | None = DEFAULT_MEMORY_MB,
    consume_main: MainConsumer | None = None,
) -> str:
    """Feed every sub-network's logits on every eval batch to ``consume``, sharing prefixes.

    ``consume(indices, batch_index, logits, labels)`` receives the logits of the sub-networks
    ``subnets[i] for i in indices`` (equal sub-networks share one call) on eval batch number
    ``batch_index``. Calls come in no particular order of sub-networks, but each sub-network
    gets its batches in order.

    Images run in chunks of consecutive batches, calibration images first, then evaluation
    images; a chunk's activations are dropped before the next chunk is read, so memory does
    not grow with the number of images. The results do not depend on the chunks.

    Args:
        model: the main network; its BN statistics and train/eval mode are restored after.
        subnets: the sub-networks (Subnets or their string forms).
        eval_batches: returns a fresh iterable of ``(images, labels)`` each call.
        calib_batches: returns a fresh iterable of training images each call, to re-estimate
            BN statistics for every sub-network (as ``bn.recalibrate``); ``None`` runs each
            sub-network with the model's own statistics.
        chunk_images: at most this many images a chunk (but at least one batch); ``None``
            sizes chunks from ``memory_mb``.
        memory_mb: MiB of activations (and images) a chunk may hold; ``None``: one chunk of
            everything, fastest when it fits. The model and one batch's temporaries come on
            top.
        consume_main: called as ``consume_main(batch_index, logits, labels)`` with the main
            network's logits (its own BN statistics, eval mode) on every eval batch, before
            any sub-network's logits on that batch.

    Returns:
        ``"shared"``, or ``"naive"`` when the model's forward could not be split into stem,
        blocks and head and each sub-network ran on its own.

    Raises:
        ValueError: no sub-networks, a sub-network that does not fit the model, no batches,
            a ``chunk_images`` or ``memory_mb`` that is not positive.
    """
    model = unwrap(model)
    if not subnets:
        raise ValueError("no sub-networks to evaluate: pass at least one")
    if chunk_images is not None and chunk_images < 1:
        raise ValueError(f"chunk_images={chunk_images} must be >= 1 or None")
    if memory_mb is not None and not memory_mb > 0:
        raise ValueError(f"memory_mb={memory_mb} must be > 0 (MiB) or None for no limit")
    budget = None if memory_mb is None else memory_mb * 2**20
    stages = find_stages(model)
    subnets = _as_subnets(model, subnets)
    for subnet in subnets:
        subnet.validate(stages)
    was_training = model.training
    saved = bn_tools.save_stats(model)
    momenta = [(m, m.momentum) for m in bn_tools.batchnorms(model)]
    try:
        calib = evals = None
        if calib_batches is not None:
            first, calib = _peek(_images(b) for b in calib_batches())
            if first is None:
                raise ValueError("calibration got no batches: pass at least one batch of images")
        else:
            first, evals = _peek(eval_batches())
            if first is None:
                raise ValueError("evaluation got no images")
            first = first[0]
        probe = first[:2]
        del first
        try:
            split = _Split(model, stages, probe)
        except _SplitFailed:
            del calib, evals  # nothing read but their first batch
            _naive(model, subnets, eval_batches, calib_batches, consume, consume_main)
            return "naive"
        del probe
        runner = _Runner(split, _build_trie(subnets), stages)

        def chunks(batches: Iterator[Any], extra: int = 0) -> Iterator[list]:
            first, batches = _peek(batches)
            if first is None:
                return iter(())
            if chunk_images is not None:
                size = chunk_images
            else:
                size = runner.images_per_chunk(_images(first), budget, extra)
            del first
            return _chunks(batches, size)

        if calib is not None:
            with split.installed():
                for chunk in chunks(calib):
                    runner.calibrate(chunk)
                    del chunk  # dropped before the next chunk is read
        if evals is None:
            evals = iter(eval_batches())
        # consume_main's caller keeps the main network's logits of a chunk's images.
        extra = split.bytes_per_image["head",] if consume_main is not None else 0
        first_batch = 0  # number of the chunk's first eval batch
        for chunk in chunks(evals, extra):
            if consume_main is not None:
                bn_tools.load_stats(model, saved)
                model.eval()
                for t, (images, labels) in enumerate(chunk):
                    consume_main(first_batch + t, model(images), labels)
            with split.installed():
                runner.evaluate(chunk, first_batch, consume)
            first_batch += len(chunk)
            del chunk
        if not first_batch:
            raise ValueError("evaluation got no images")
        return "shared"
    finally:
        for m, momentum in momenta:
            m.momentum = momentum
        bn_tools.load_stats(model, saved)
        model.train(was_training)


def _naive(
    model: nn.Module,
    subnets: Sequence[Subnet],
    eval_batches: EvalBatches,
    calib_batches: CalibBatches | None,
    consume: Consumer,
    consume_main: MainConsumer | None,
) -> None:
    """One sub-network at a time (a model whose forward cannot be split).

    Nothing is cached: ``bn.recalibrate`` and the evaluation stream their batches. With
    ``consume_main`` the loops turn around: the BN statistics re-estimated for each
    sub-network are kept (no images), and each eval batch runs through the main network
    and then through every sub-network.
    """
    seen = 0
    if consume_main is None:
        for index, subnet in enumerate(subnets):
            if calib_batches is not None:
                bn_tools.recalibrate(model, calib_batches(), subnet)
            model.eval()
            with use_subnet(model, subnet):
                for t, (images, labels) in enumerate(eval_batches()):
                    consume([index], t, model(images), labels)
                    seen += 1
            if not seen:
                raise ValueError("evaluation got no images")
        return
    own = bn_tools.save_stats(model)
    stats = []
    if calib_batches is not None:
        for subnet in subnets:
            bn_tools.recalibrate(model, calib_batches(), subnet)
            stats.append(bn_tools.save_stats(model))
    model.eval()
    for t, (images, labels) in enumerate(eval_batches()):
        bn_tools.load_stats(model, own)
        consume_main(t, model(images), labels)
        for index, subnet in enumerate(subnets):
            if stats:
                bn_tools.load_stats(model, stats[index])
            with use_subnet(model, subnet):
                consume([index], t, model(images), labels)
        seen += 1
    if not seen:
        raise ValueError("evaluation got no images")


def evaluate_subnets_shared(
    model: nn.Module,
    subnets: Sequence[Subnet | str],
    eval_batches: EvalBatches,
    calib_batches: CalibBatches | None,
    chunk_images: int | None = None,
    memory_mb: float | None = DEFAULT_MEMORY_MB,
) -> list[dict]:
    """Accuracy of each sub-network, BN re-calibrated for it, sharing common prefixes.

    A drop-in for :func:`nestedtrain.engine.evaluate.evaluate_subnets` with the same result:
    ``[{"subnet", "acc", "acc5", "loss"}]`` in the order of ``subnets`` (accuracies in percent,
    counts all-reduced when distributed). ``calib_batches=None`` keeps the model's own BN
    statistics for every sub-network instead of re-estimating them. ``chunk_images`` and
    ``memory_mb`` bound the memory (see :func:`subnet_logits`), not the result.
    """
    model = unwrap(model)
    subnets = _as_subnets(model, subnets)
    # Each sub-network gets its batches in order, so each sum runs in evaluate's order.
    counts: dict[int, torch.Tensor] = {}

    def consume(indices: list[int], t: int, logits: torch.Tensor, labels: torch.Tensor) -> None:
        leaf = indices[0]
        counts.setdefault(leaf, torch.zeros(4, dtype=torch.float64))
        counts[leaf] += batch_counts(logits, labels)

    subnet_logits(model, subnets, eval_batches, calib_batches, consume, chunk_images, memory_mb)
    first_index = {}
    for i, subnet in enumerate(subnets):
        first_index.setdefault(subnet, i)
    device = next(model.parameters()).device
    return [
        {"subnet": str(subnet), **metrics_from_counts(counts[first_index[subnet]], device)}
        for subnet in subnets
    ]


# ----------------------------------------------------------------------- the analysis
def space_subnets(
    model: nn.Module, space: Any = None, sample: int | None = None, seed: int = 0
) -> list[Subnet]:
    """The ordered sub-networks of a sampling space, or a seeded sample of ``sample`` of them.

    Args:
        model: the main network.
        space: ``None``/``"full"`` (every ordered depth), a name from ``SAMPLING_SPACES``
            (``"space3"``), an int or per-stage list of how many trailing blocks may drop.
        sample: evaluate this many, drawn without replacement (all when the space is not
            larger); kept in the space's order, deepest first.
        seed: seeds the sample.
    """
    everything = OrderedSampler(unwrap(model), max_drop=space).all()
    if sample is None or sample >= len(everything):
        if sample is not None and sample < 1:
            raise ValueError(f"sample={sample}: evaluate at least 1 sub-network")
        return everything
    if sample < 1:
        raise ValueError(f"sample={sample}: evaluate at least 1 sub-network")
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(everything), generator=g)[:sample].sort().values.tolist()
    return [everything[i] for i in picks]


def subnet_stats(accuracies: Sequence[float]) -> dict[str, float]:
    """Count, max, mean, population standard deviation and min of accuracies."""
    if not accuracies:
        raise ValueError("no accuracies to summarise")
    n = len(accuracies)
    mean = sum(accuracies) / n
    std = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / n)
    return {"count": n, "max": max(accuracies), "mean": mean, "std": std, "min": min(accuracies)}


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def match_subnet(main: nn.Module, other: nn.Module) -> Subnet:
    """The ordered sub-network of ``main`` whose architecture is ``other``'s.

    ``other`` matches when the standalone copy of that sub-network
    (:func:`~nestedtrain.elastic.export_subnet`) has exactly ``other``'s ``state_dict`` names
    and shapes: a resnet32 is the ``5-5-5`` of a resnet56.

    Raises:
        ValueError: ``other`` is no sub-network of ``main``.
    """
    main, other = unwrap(main), unwrap(other)
    main_name, other_name = type(main).__name__, type(other).__name__
    try:
        other_stages = find_stages(other)
    except ValueError:
        raise ValueError(
            f"the {other_name} has no stages nestedtrain knows, so it is no sub-network of the "
            f"main {main_name}"
        ) from None
    main_stages = find_stages(main)
    depths = [len(stage) for stage in other_stages]
    main_depths = [len(stage) for stage in main_stages]
    described = f"a {other_name} with depths {'-'.join(map(str, depths))}"
    if type(main) is not type(other) or len(depths) != len(main_depths):
        raise ValueError(
            f"{described} is no sub-network of the main {main_name} "
            f"({'-'.join(map(str, main_depths))}): give a model of the same family"
        )
    if any(d > m for d, m in zip(depths, main_depths)):
        raise ValueError(
            f"{described} is deeper than the main network "
            f"({'-'.join(map(str, main_depths))}) in some stage, so it is none of its sub-networks"
        )
    subnet = Subnet(tuple(range(d)) for d in depths)
    try:
        subnet.validate(main_stages)
    except ValueError as err:
        raise ValueError(
            f"{described} is no ordered sub-network of the main network: {err}"
        ) from None
    if _shapes(export_subnet(main, subnet)) != _shapes(other):
        raise ValueError(
            f"{described} has the depths of sub-network {subnet} of the main {main_name} but "
            "other tensor names or shapes (widths, classes): it is not that sub-network"
        )
    return subnet


def evaluate_space(
    model: nn.Module,
    eval_batches: EvalBatches,
    calib_batches: CalibBatches,
    space: Any = None,
    sample: int | None = None,
    seed: int = 0,
    individual: Sequence[tuple[str, nn.Module]] = (),
    chunk_images: int | None = None,
    memory_mb: float | None = DEFAULT_MEMORY_MB,
) -> dict[str, Any]:
    """Accuracy of every sub-network of an ordered sampling space, BN re-calibrated for each.

    Args:
        model: the main network.
        eval_batches, calib_batches: as for :func:`evaluate_subnets_shared`.
        space, sample, seed: which sub-networks (see :func:`space_subnets`).
        individual: ``(label, model)`` pairs of individually trained models, each of the
            architecture of one sub-network (see :func:`match_subnet`); each is evaluated
            with its own BN statistics, and its sub-network is evaluated inside ``model``
            even when the sample left it out.
        chunk_images, memory_mb: bound the memory, not the result (see :func:`subnet_logits`).

    Returns:
        ``main`` (the model with its own BN statistics), ``subnets`` (per sub-network:
        ``subnet``, ``blocks``, ``acc``, ``acc5``, ``loss``, ``in_space``), ``stats`` (over
        the sub-networks of the space), ``individual``, and the selection.
    """
    model = unwrap(model)
    chosen = space_subnets(model, space, sample, seed)
    space_size = len(OrderedSampler(model, max_drop=space))
    matched = [(label, other, match_subnet(model, other)) for label, other in individual]
    extra = [s for _, _, s in matched if s not in chosen]
    extra = list(dict.fromkeys(extra))
    subnets = chosen + extra
    results = evaluate_subnets_shared(
        model, subnets, eval_batches, calib_batches, chunk_images, memory_mb
    )
    rows = []
    for subnet, result in zip(subnets, results):
        rows.append(
            {
                **result,
                "blocks": subnet.num_blocks,
                "depths": list(subnet.depths),
                "in_space": subnet in chosen,
            }
        )
    by_subnet = {row["subnet"]: row for row in rows}
    individual_rows = []
    for label, other, subnet in matched:
        own = evaluate(other, eval_batches())
        individual_rows.append(
            {
                "label": label,
                "subnet": str(subnet),
                "acc": own["acc"],
                "acc5": own["acc5"],
                "acc_inside": by_subnet[str(subnet)]["acc"],
            }
        )
    main = evaluate(model, eval_batches())
    return {
        "space": "full" if space is None else space,
        "space_size": space_size,
        "sample": sample,
        "seed": seed,
        "bn": "recalibrated per sub-network",
        "main": main,
        "subnets": rows,
        "stats": subnet_stats([row["acc"] for row in rows if row["in_space"]]),
        "individual": individual_rows,
    }
