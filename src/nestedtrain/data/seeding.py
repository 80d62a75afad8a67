"""Seeds and generators of the data path: every random draw is a function of the run's seed.

A stream is named by its own tag: ``make_generator(seed, epoch, SHUFFLE)`` is the epoch's
order. A training batch draws its :class:`BatchSeeds` from the epoch's ``AUGMENT`` generator,
in one order on both paths (the tensor path then draws the batch's crops and flips from the
same generator: that order is part of its results). timm's and torchvision's transforms draw
from the global ``random``, numpy and torch RNGs, so they run inside :func:`host_rng_scope`,
which seeds those for the call and restores them afterwards: the trainer's own streams (which
it seeds and checkpoints) are never touched.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable, NamedTuple

import numpy as np
import torch

__all__ = [
    "AUGMENT",
    "CALIB",
    "LIGHTING",
    "SAMPLE",
    "SHUFFLE",
    "SPLIT",
    "WORKERS",
    "BatchSeeds",
    "derive_seed",
    "host_rng_reseeder",
    "host_rng_scope",
    "make_generator",
]

# The streams' tags (their values are part of every seeded result: never renumber them).
SPLIT = 0  # (seed): the validation split (or folds) and the train subset
SHUFFLE = 1  # (seed, epoch): the epoch's order of the training images
AUGMENT = 2  # (seed, epoch, rank): BatchSeeds, and the tensor path's crops and flips
SAMPLE = 3  # (seed, epoch): an image folder's per-image transform seeds
CALIB = 4  # (seed): the BN re-calibration images
LIGHTING = 5  # (BatchSeeds.photometric): the PCA lighting noise's weights
WORKERS = 6  # (seed): the DataLoader's base seed of its workers


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every key (e.g. seed, epoch, rank) and mixes them well."""
    state = np.random.SeedSequence([int(k) % 2**64 for k in keys]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def make_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from ``keys``: CPU so that CPU and CUDA runs draw the same numbers."""
    return torch.Generator().manual_seed(derive_seed(*keys))


class BatchSeeds(NamedTuple):
    """The seeds of one training batch's host-RNG stages, drawn in this order on both paths.

    Attributes:
        photometric: the per-image PIL stage of a tensor dataset (its host RNG scope); the
            lighting noise draws from ``make_generator(photometric, LIGHTING)``.
        erase: timm's RandomErasing (its host RNG scope).
        mix: timm's Mixup/CutMix (its host RNG scope).
    """

    photometric: int
    erase: int
    mix: int

    @classmethod
    def draw(cls, generator: torch.Generator) -> BatchSeeds:
        """The next batch's seeds from ``generator`` (three draws, skipped batches included)."""
        return cls(*torch.randint(2**62, (3,), generator=generator).tolist())


@contextmanager
def host_rng_reseeder(device: torch.device | None = None) -> Iterator[Callable[[int], None]]:
    """Save Python's, numpy's and torch's CPU global RNGs (and ``device``'s, on CUDA), yield a
    function that seeds them all from one seed, and restore them on the way out.

    One save and restore for many seeds: a batch decoded in the main process seeds the RNGs
    once per image (see :func:`host_rng_scope`) at a fraction of the cost of a scope each.
    """
    py_state, np_state, torch_state = (
        random.getstate(),
        np.random.get_state(),
        torch.get_rng_state(),
    )
    cuda = device is not None and device.type == "cuda"
    cuda_state = torch.cuda.get_rng_state(device) if cuda else None

    def reseed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        # Not torch.manual_seed: that would also reseed every CUDA generator, outside the scope.
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[device.index or 0].manual_seed(seed)

    try:
        yield reseed
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda:
            torch.cuda.set_rng_state(cuda_state, device)


@contextmanager
def host_rng_scope(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Seed Python's, numpy's and torch's CPU global RNGs for a block, then restore them.

    timm's AutoAugment/RandAugment/AugMix, RandomErasing and Mixup and torchvision's
    ColorJitter draw from these global RNGs; the scope makes them a function of ``seed``
    without disturbing the streams the trainer seeds and checkpoints. With a CUDA ``device``,
    that device's generator is seeded and restored too (for noise drawn on the GPU, e.g.
    RandomErasing's); its state lives on the host, so this does not wait for the GPU.
    """
    with host_rng_reseeder(device) as reseed:
        reseed(seed)
        yield
