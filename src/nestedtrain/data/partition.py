"""Which images go where: the seeded train/val split, and an epoch's batches over the ranks."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from .seeding import SHUFFLE, SPLIT, make_generator

__all__ = ["Sharding", "split_train"]


def split_train(
    n: int,
    val_size: float,
    train_subset: int | None,
    seed: int,
    num_folds: int = 0,
    fold: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, val) index split of ``n`` training images; the subset is drawn after.

    With ``num_folds`` the seeded order is cut into that many near-equal folds and fold
    ``fold`` is the validation split (k-fold cross-validation on the training set).

    Raises:
        ConfigError: ``train_subset`` is more than the images left after the split.
    """
    order = torch.randperm(n, generator=make_generator(seed, SPLIT)).numpy()
    if num_folds:
        start, end = n * fold // num_folds, n * (fold + 1) // num_folds
        val, rest = order[start:end], np.concatenate([order[:start], order[end:]])
    else:
        n_val = max(1, round(val_size * n)) if val_size > 0 else 0
        val, rest = order[:n_val], order[n_val:]
    if train_subset is not None:
        if train_subset > len(rest):
            raise ConfigError(
                f"data.train_subset={train_subset} is more than the {len(rest)} training images "
                f"left after holding out {len(val)} for validation"
            )
        # ``rest`` is already in seeded random order: its head is a seeded random choice.
        rest = rest[:train_subset]
    return np.sort(rest), np.sort(val)


@dataclass(frozen=True)
class Sharding:
    """Which training images each rank takes at each step of an epoch."""

    n_train: int
    batch_size: int  # global
    rank: int
    world_size: int
    seed: int

    @property
    def steps(self) -> int:
        return self.n_train // self.batch_size  # the last partial batch is dropped

    def rank_batches(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        """This rank's image indices at each step of ``epoch``, from step ``start`` on."""
        # One permutation per epoch for all ranks; step s takes global batch s of it and each
        # rank its own contiguous slice, so the ranks' batches make up the one-rank batch.
        order = torch.randperm(self.n_train, generator=make_generator(self.seed, epoch, SHUFFLE))
        local = self.batch_size // self.world_size
        for step in range(start, self.steps):
            first = step * self.batch_size + self.rank * local
            yield order[first : first + local]
