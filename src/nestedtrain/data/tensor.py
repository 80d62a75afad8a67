"""The tensor path: a small dataset held as uint8 tensors, augmented a batch at a time.

Digits, Fashion-MNIST and CIFAR are read whole (``datasets.load_arrays``), stored on the
device (unless ``data.on_device=false``) and cropped, flipped and resized with tensor ops on
whole batches, airbench-style: no loader workers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Callable

import numpy as np
import torch

from .base import Data
from .checks import check_labels
from .config import DataConfig
from .datasets import DatasetSpec, load_arrays
from .partition import split_train
from .seeding import AUGMENT, BatchSeeds, make_generator
from .transforms import (
    apply_pil_transform,
    normalize,
    random_pad_crop_flip,
    random_resized_crop_flip,
    resize,
    to_device,
    to_uint8,
)

__all__ = ["TensorData", "tensor_data"]


class TensorData(Data):
    """A small dataset held as uint8 tensors, augmented a batch at a time on the device."""

    def __init__(
        self,
        cfg: DataConfig,
        spec: DatasetSpec,
        splits: dict[str, tuple[np.ndarray, np.ndarray]],
        classes: Sequence[str],
        pil_augment: Callable | None,
        *,
        storage: torch.device,
        **kwargs: Any,
    ):
        super().__init__(
            cfg,
            spec,
            classes=classes,
            n_train=len(splits["train"][1]),
            n_val=len(splits["val"][1]),
            n_test=len(splits["test"][1]),
            **kwargs,
        )
        self._tensors = {
            name: (torch.from_numpy(x).to(storage), torch.from_numpy(y).to(storage))
            for name, (x, y) in splits.items()
        }
        self._pil_augment = pil_augment

    def train_batches(
        self, epoch: int, start: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self._tensors["train"]
        # One generator for the batch's seeds and its crops and flips, drawn in turn.
        generator = make_generator(self.seed, epoch, self.rank, AUGMENT)
        for step, index in enumerate(self._sharding.rank_batches(epoch)):
            index = to_device(index, images.device)
            x = images[index].to(self.device, non_blocking=True)
            seeds = BatchSeeds.draw(generator)
            x = self._crop_flip(x, generator)
            if step < start:
                # A skipped batch still draws its crops and flips, so that the generator is
                # where an uninterrupted epoch has it at ``start``; the rest draws from seeds.
                continue
            if self._pil_augment is not None:
                x = apply_pil_transform(x, self._pil_augment, seeds.photometric)
            y = labels[index].to(self.device, non_blocking=True)
            yield self._finish(x, y, seeds)

    def _crop_flip(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.crop == "rrc":
            return random_resized_crop_flip(x, self.img_size, self.hflip, generator)
        if x.shape[-1] != self.img_size:
            x = to_uint8(resize(x, self.img_size))
        padding = self.crop_padding if self.crop == "pad" else 0
        return random_pad_crop_flip(x, padding, self.hflip, generator)

    def _eval_batches(
        self, split: str, start: int, end: int, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self._tensors[split]
        for lo in range(start, end, batch_size):
            hi = min(lo + batch_size, end)
            yield self._eval_images(images[lo:hi]), labels[lo:hi].to(self.device)

    def _calibration_batches(self, index: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
        images, _ = self._tensors["train"]
        for chunk in to_device(index, images.device).split(batch_size):
            yield self._eval_images(images[chunk])

    def _eval_images(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True)
        return normalize(resize(x, self.test_img_size), self.mean, self.std)


def tensor_data(
    cfg: DataConfig, spec: DatasetSpec, pil_augment: Callable | None, common: dict[str, Any]
) -> TensorData:
    """A dataset held as tensors: its training split divided into train and val, its test
    split as test, stored on ``common["device"]`` unless ``cfg.on_device`` is false;
    ``common`` holds the keyword arguments of :class:`Data` (batch_size, seed, device, ...).

    Raises:
        ConfigError: labels outside the dataset's classes.
        FileNotFoundError: the dataset is not on disk (and not downloaded).
    """
    arrays = load_arrays(cfg.name, cfg.root, cfg.download)
    check_labels(cfg.name, arrays.train_labels, len(arrays.classes))
    check_labels(cfg.name, arrays.test_labels, len(arrays.classes))
    seed = common["seed"]
    train_index, val_index = split_train(
        len(arrays.train_labels), cfg.val_size, cfg.train_subset, seed, cfg.num_folds, cfg.fold
    )
    splits = {
        "train": (arrays.train_images[train_index], arrays.train_labels[train_index]),
        "val": (arrays.train_images[val_index], arrays.train_labels[val_index]),
        "test": (arrays.test_images, arrays.test_labels),
    }
    on_device = True if cfg.on_device is None else cfg.on_device
    storage = common["device"] if on_device else torch.device("cpu")
    return TensorData(cfg, spec, splits, arrays.classes, pil_augment, storage=storage, **common)
