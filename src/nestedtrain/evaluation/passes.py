"""Every sub-network's logits, with the blocks that sub-networks share computed once.

The sub-networks' blocks form a trie (:func:`nestedtrain.elastic.build_trie`), and each trie
node is computed once for all the sub-networks below it, with the model run piece by piece
(:class:`nestedtrain.elastic.ModelSplit`), in two passes:

- **BN re-calibration.** ``bn.recalibrate`` estimates a BN's statistics cumulatively over the
  calibration batches, in train mode, where a block's input is the train-mode output of the
  blocks before it. That input depends only on the prefix, so each node re-estimates its own
  block's BNs once from its parent's outputs on the calibration batches, with the same
  batches, order and ``n / (seen + n)`` weighting, and keeps them for every sub-network below
  it.
- **Evaluation.** Each node runs its block, in eval mode with its own statistics, on its
  parent's outputs on the evaluation images; each leaf runs the head.

The logits equal those of one whole sub-network evaluated after another (BN re-estimated for
each with ``bn.recalibrate``) exactly, as long as train mode draws no random numbers (no
dropout or drop-path before a BN); the tests hold that oracle. Children that continue the
same stage are visited last, and a node's outputs are released before its last child runs, so
memory holds about one set of activations per stage.

**Memory.** Both passes run on chunks of consecutive batches, the calibration images first,
then the evaluation images. A node puts its BN statistics and its count of images seen away
between chunks (train-mode BN outputs do not depend on them), so chunking changes nothing in
the result. Chunks are sized from a budget (``memory_mb``) and from the activation sizes the
model produced on a probe image, so memory does not grow with the number of images (ResNet-50
at 224 px holds at most 6.7 MiB an image, its activations and the image itself: the default
1024 MiB runs chunks of 152 images, whichever of its sub-networks are evaluated).

A model whose forward cannot be split is evaluated one sub-network at a time instead
(:mod:`nestedtrain.evaluation.one_at_a_time`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import bn
from ..elastic.split import ModelSplit, SplitError, bytes_per_image
from ..elastic.stages import Stage, find_stages, unwrap
from ..elastic.subnet import Subnet
from ..elastic.trie import HEAD, STEM, TrieNode, build_trie, walk_trie
from ..errors import ConfigError
from ..modes import kept_modes
from .batches import (
    DEFAULT_MEMORY_MB,
    CalibBatches,
    Consumer,
    EvalBatches,
    MainConsumer,
    chunks,
    device_of,
    first_images,
    images_of,
    memory_budget,
    peek,
    pieces,
    within_free_memory,
)
from .one_at_a_time import one_at_a_time_logits

__all__ = ["parse_subnets", "subnet_logits"]


@dataclass(eq=False)
class _Node(TrieNode):
    """A trie node with its BNs' re-estimated statistics and how many images they saw."""

    stats: list[tuple[torch.Tensor | None, ...]] | None = None
    seen: int = 0


def _set_mode(split: ModelSplit, training: bool) -> None:
    """Calibration mode (only BN trains, as in ``bn.recalibrate``) or eval mode for the whole
    model, the emptied stages' blocks included."""
    set_one = bn.calibration_mode if training else nn.Module.eval
    set_one(split.model)
    for stage in split.stages:
        for block in stage.blocks:
            set_one(block)


class _Runner:
    """Shared-prefix passes over a trie of sub-networks, one chunk of images at a time."""

    def __init__(self, split: ModelSplit, root: _Node, stages: Sequence[Stage]):
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
            out = sizes[node.key] if node.key.is_block else 0  # a head's logits go at once
            kept = held if last else held + inputs
            children = node.ordered_children()
            return max(
                [held + inputs + out]
                + [peak(c, kept, out, i == len(children) - 1) for i, c in enumerate(children)]
            )

        stem = sizes[STEM]
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
        per_image = bytes_per_image(images) + extra
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
            bn.load_layer_stats(layers, node.stats)
        outputs = []
        for x in inputs:
            n = x.shape[0]
            bn.set_cumulative_momentum(layers, node.seen, n)
            outputs.append(run(x))
            node.seen += n
        node.stats = bn.save_layer_stats(layers)
        return outputs

    def calibrate(self, batches: list[torch.Tensor]) -> None:
        """Run one chunk of calibration batches through the trie (in order, chunk after
        chunk: each node's statistics continue from the previous chunk's)."""
        _set_mode(self.split, True)
        walk_trie(self.root, [batches], self._calibrate)

    def _calibrate(self, node: _Node, inputs: list[torch.Tensor]) -> list[torch.Tensor] | None:
        split = self.split
        if node.key.is_stem:
            return self._calibrated(node, split.stem_bns, inputs, split.stem)
        if node.key.is_head:
            if split.head_bns:
                self._calibrated(node, split.head_bns, inputs, split.head)
            return None
        block = split.block(node.key)
        return self._calibrated(node, bn.batchnorms(block), inputs, block)

    # --------------------------------------------------------------------- eval pass
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]], first: int, consume):
        """Run the eval batches (numbered from ``first``) through the trie."""
        _set_mode(self.split, False)
        labels = [y for _, y in batches]

        def run(node: _Node, inputs: list[torch.Tensor]) -> list[torch.Tensor] | None:
            split = self.split
            layers = split.stem_bns if node.key.is_stem else split.head_bns
            if node.key.is_block:
                layers = bn.batchnorms(split.block(node.key))
            if node.stats is not None:
                bn.load_layer_stats(layers, node.stats)
            if node.key.is_head:
                for t, x in enumerate(inputs):
                    consume(node.subnets, first + t, split.head(x), labels[t])
                return None
            piece = split.stem if node.key.is_stem else split.block(node.key)
            return [piece(x) for x in inputs]

        walk_trie(self.root, [[x for x, _ in batches]], run)


def _sized_chunks(
    batches: Iterator[Any],
    runner: _Runner,
    chunk_images: int | None,
    budget: float | None,
    extra: int = 0,
    split_batches: bool = False,
) -> Iterator[list]:
    """``batches`` in chunks of ``chunk_images``, or of as many images as ``budget`` holds.

    With ``split_batches`` (evaluation batches, eval-mode BN) a batch larger than that is
    split to fit; calibration batches are not (train-mode BN normalises by the batch's own
    statistics, so a calibration chunk holds at least one whole batch)."""
    first, batches = peek(batches)
    if first is None:
        return iter(())
    if chunk_images is not None:
        size = chunk_images
    else:
        size = runner.images_per_chunk(images_of(first), budget, extra)
    del first
    if split_batches and size:
        batches = pieces(batches, size)
    return chunks(batches, size)


def _calibration_pass(runner: _Runner, calib: Iterator | None, sizes: tuple) -> None:
    """Every trie node's BN statistics re-estimated from the calibration images (if any),
    chunk by chunk; a chunk is dropped before the next one is read."""
    if calib is None:
        return
    with runner.split.installed():
        for chunk in _sized_chunks(calib, runner, *sizes):
            runner.calibrate(chunk)
            del chunk


def _evaluation_pass(
    saved: dict[str, torch.Tensor],
    runner: _Runner,
    evals: Iterator[Any],
    sizes: tuple[int | None, float | None],
    consume: Consumer,
    consume_main: MainConsumer | None,
) -> None:
    """Each chunk of eval batches (``sizes``: chunk_images, budget) through the main network
    (``consume_main``, with its BN statistics ``saved``) and then through the trie."""
    model = runner.split.model
    # consume_main's caller keeps the main network's logits of a chunk's images.
    extra = runner.split.bytes_per_image[HEAD] if consume_main is not None else 0
    eval_chunks = _sized_chunks(evals, runner, *sizes, extra, split_batches=True)
    first_batch = 0  # number of the chunk's first eval batch
    for chunk in eval_chunks:
        if consume_main is not None:
            bn.load_stats(model, saved)
            model.eval()
            for t, (images, labels) in enumerate(chunk):
                consume_main(first_batch + t, model(images), labels)
        with runner.split.installed():
            runner.evaluate(chunk, first_batch, consume)
        first_batch += len(chunk)
        del chunk
    if not first_batch:
        raise ConfigError("evaluation got no images")


def parse_subnets(
    model: nn.Module, subnets: Sequence[Subnet | str], stages: Sequence[Stage] | None = None
) -> list[Subnet]:
    """Subnets from Subnets or their strings; checked against ``stages`` when given."""
    parsed = [Subnet.parse(model, s) if isinstance(s, str) else s for s in subnets]
    for subnet in parsed if stages is not None else ():
        subnet.validate(stages)
    return parsed


@contextlib.contextmanager
def _bn_restored(model: nn.Module) -> Iterator[dict]:
    """The model's BN statistics (yielded) and momenta, put back however the block ends."""
    saved = bn.save_stats(model)
    momenta = [(m, m.momentum) for m in bn.batchnorms(model)]
    try:
        yield saved
    finally:
        for m, momentum in momenta:
            m.momentum = momentum
        bn.load_stats(model, saved)


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

    Args:
        model: the main network; its BN statistics and modes are restored after.
        subnets: the sub-networks (Subnets or strings).
        eval_batches: returns a fresh iterable of ``(images, labels)`` each call.
        calib_batches: returns a fresh iterable of training images each call, to re-estimate
            BN statistics for every sub-network (as ``bn.recalibrate``); ``None`` runs each
            sub-network with the model's own statistics.
        chunk_images: at most this many images a chunk (see :func:`_sized_chunks`); ``None``
            sizes chunks from ``memory_mb``.
        memory_mb: MiB of activations (and images) a chunk of consecutive batches may hold,
            calibration images first (a chunk is dropped before the next is read; results do
            not depend on chunks but for the loss's last bits where a batch is split);
            ``None``: one chunk of everything. The model and one batch's temporaries come on
            top. On CUDA, at most half the device memory free when it starts.
        consume_main: called as ``consume_main(batch_index, logits, labels)`` with the main
            network's logits (its own BN statistics, eval mode) on every eval batch, before
            any sub-network's logits on that batch.

    Returns:
        ``"shared"``, or ``"naive"`` when the forward could not be split into stem, blocks
        and head and each sub-network ran on its own.

    Raises:
        ConfigError: no sub-networks, a sub-network that does not fit the model, no batches,
            a ``chunk_images`` or ``memory_mb`` that is not positive.
    """
    model = unwrap(model)
    budget = within_free_memory(memory_budget(subnets, chunk_images, memory_mb), device_of(model))
    stages = find_stages(model)
    subnets = parse_subnets(model, subnets, stages)
    with _bn_restored(model) as saved, kept_modes(model):
        probe, calib, evals = first_images(calib_batches, eval_batches)
        try:
            split = ModelSplit(model, stages, probe)
        except SplitError:
            del calib, evals  # nothing read but their first batch
            one_at_a_time_logits(model, subnets, eval_batches, calib_batches, consume, consume_main)
            return "naive"
        runner, probe = _Runner(split, build_trie(subnets, _Node), stages), None
        _calibration_pass(runner, calib, (chunk_images, budget))
        evals = iter(eval_batches()) if evals is None else evals
        _evaluation_pass(saved, runner, evals, (chunk_images, budget), consume, consume_main)
        return "shared"
