"""The folder path's PIL sample: an image file read (or replaced when it does not decode) and
transformed inside its own seed scope, in whichever worker reads it."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from .images import read_or_replace
from .seeding import host_rng_scope

__all__ = ["FolderSamples", "pil_sample"]


class FolderSamples(Dataset):
    """(path, label) samples read with ``loader`` and transformed, with a report of bad files.

    A key is an index, or ``(index, seed)`` to run the transform inside ``host_rng_scope(seed)``
    so that an image's augmentation does not depend on which worker reads it. A file that does
    not decode is replaced by the next one that does (``read_or_replace``); the third item of
    a sample reports it to the main process ("" when none was bad).
    """

    def __init__(self, samples: list[tuple[str, int]], loader: Callable, transform: Callable):
        self.samples, self.loader, self.transform = samples, loader, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, int, str]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        return pil_sample(self.samples, index, seed, self.loader, self.transform)


def pil_sample(
    samples: Sequence[tuple[str, int]],
    index: int,
    seed: int | None,
    loader: Callable,
    transform: Callable,
) -> tuple[torch.Tensor, int, str]:
    """Sample ``index`` (or the next that decodes) through the PIL path: image, label, report."""
    image, label, report = read_or_replace(samples, index, loader)
    with host_rng_scope(seed) if seed is not None else nullcontext():
        return transform(image), label, report
