"""The folder path: an image-folder tree read by DataLoader workers with timm's transforms.

``root/train`` is split into train and val, ``root/val`` is the test split. A worker reads an
image and runs the per-image transform up to a uint8 tensor (``samples.py``; with
``data.decoder=torchcodec|dali`` it sends the JPEG bytes and the main process decodes them,
``decode.py``); normalisation, lighting noise, erasing and mixing follow on the device, a
batch at a time (on CUDA one batch ahead, on a side stream). An image's crops, flips and PIL
augmentations are seeded by ``(seed, epoch)`` and the image, so that they do not depend on
the number of workers.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import ImageFolder

from ..errors import ConfigError
from .base import Data
from .config import DataConfig
from .datasets import DatasetSpec
from .decode import BatchDecoder, EncodedSamples, collate_encoded, make_decode
from .partition import Sharding, split_train
from .samples import FolderSamples
from .seeding import AUGMENT, SAMPLE, BatchSeeds, make_generator
from .transforms import folder_eval_transform, folder_train_transform, normalize
from .workers import ahead_on_device, default_workers, loader_options, stop_at_exit, stop_workers

__all__ = ["FolderData", "folder_data"]


class _TrainBatchSampler(Sampler):
    """Yields this rank's ``(index, seed)`` lists, the same sharding as the on-device path."""

    def __init__(self, sharding: Sharding):
        # Holds no reference to the Data: a cycle through the DataLoader would leave its
        # workers to the garbage collector, which then waits seconds to stop them.
        self.sharding = sharding
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.sharding.steps - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        sharding = self.sharding
        seeds = torch.randint(
            2**62, (sharding.n_train,), generator=make_generator(sharding.seed, self.epoch, SAMPLE)
        )
        for index in sharding.rank_batches(self.epoch, self.start):
            # A sample's seed follows the image, so it is the same for any number of ranks.
            yield list(zip(index.tolist(), seeds[index].tolist()))


class FolderData(Data):
    """An image-folder tree read by DataLoader workers with timm's per-image transforms."""

    def __init__(
        self,
        cfg: DataConfig,
        spec: DatasetSpec,
        splits: dict[str, list[tuple[str, int]]],
        classes: Sequence[str],
        loader: Callable,
        pil_augment: Callable | None,
        **kwargs: Any,
    ):
        super().__init__(
            cfg,
            spec,
            classes=classes,
            n_train=len(splits["train"]),
            n_val=len(splits["val"]),
            n_test=len(splits["test"]),
            **kwargs,
        )
        self._splits, self._loader = splits, loader
        self.n_calib = len(splits.get("calib", splits["train"]))
        self._workers = default_workers() if cfg.num_workers is None else cfg.num_workers
        # decoder=torchcodec|dali: the workers read bytes, the main process decodes
        self._decode = (
            None if cfg.decoder == "pil" else make_decode(cfg.decoder, self.device, self._workers)
        )
        train_transform = folder_train_transform(
            self.img_size, self.crop, self.crop_padding, self.hflip, pil_augment
        )
        self._eval_transform = folder_eval_transform(self.test_img_size, cfg.test_crop_pct)
        self._train_sampler = _TrainBatchSampler(self._sharding)
        self._train_loader, self._train_unpack = self._make_loader(
            splits["train"], train_transform, batch_sampler=self._train_sampler, persistent=True
        )
        # The persistent workers end when this object is collected, or at interpreter exit
        # (before multiprocessing's own exit handler, which would wait for them forever).
        self._stop = weakref.finalize(self, stop_workers, self._train_loader)
        stop_at_exit(self._train_loader)

    def close(self) -> None:
        stop_workers(self._train_loader)

    def _make_loader(
        self,
        samples: list[tuple[str, int]],
        transform: Callable,
        persistent: bool = False,
        **batching: Any,
    ) -> tuple[DataLoader, Callable[[Any], tuple[torch.Tensor, torch.Tensor]]]:
        """A DataLoader of ``samples`` (``batching``: its batch sampler or size) and the
        function that turns its batches into uint8 images and labels on the device."""
        if self._decode is None:
            dataset: Dataset = FolderSamples(samples, self._loader, transform)
            collate = None
        else:
            dataset, collate = EncodedSamples(samples, self._loader, transform), collate_encoded
        loader = DataLoader(
            dataset,
            collate_fn=collate,
            **batching,
            **loader_options(self._workers, self.device, self.seed, persistent),
        )
        device, bad_images = self.device, self.bad_images
        decoder = (
            None
            if self._decode is None
            else BatchDecoder(self._decode, device, samples, self._loader, transform)
        )

        # No reference to self: the train loader's ``unpack`` is kept on self, and a cycle
        # would leave its persistent workers to the garbage collector (see _TrainBatchSampler).
        def unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
            x, y, reports = batch if decoder is None else decoder(batch)
            bad_images.record(reports)
            return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

        return loader, unpack

    def _eval_loader(
        self, samples: list[tuple[str, int]], batch_size: int
    ) -> tuple[DataLoader, Callable[[Any], tuple[torch.Tensor, torch.Tensor]]]:
        return self._make_loader(
            samples, self._eval_transform, batch_size=batch_size, shuffle=False
        )

    def train_batches(
        self, epoch: int, start: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Images and their augmentation are a function of (seed, epoch, place in the epoch),
        # so starting at ``start`` reads no skipped image; only the batch seeds are drawn.
        self._train_sampler.set_epoch(epoch, start)
        generator = make_generator(self.seed, epoch, self.rank, AUGMENT)
        for _ in range(start):
            BatchSeeds.draw(generator)

        def prepare(batch: Any):
            x, y = self._train_unpack(batch)
            return self._finish(x, y, BatchSeeds.draw(generator))

        yield from ahead_on_device(self._train_loader, prepare, self.device)

    def _eval_batches(
        self, split: str, start: int, end: int, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader, unpack = self._eval_loader(self._splits[split][start:end], batch_size)

        def prepare(batch: Any):
            x, y = unpack(batch)
            return normalize(x, self.mean, self.std), y

        yield from ahead_on_device(loader, prepare, self.device)

    def _calibration_batches(self, index: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
        train = self._splits.get("calib", self._splits["train"])

        loader, unpack = self._eval_loader([train[i] for i in index.tolist()], batch_size)

        def prepare(batch: Any):
            return (normalize(unpack(batch)[0], self.mean, self.std),)

        for (x,) in ahead_on_device(loader, prepare, self.device):
            yield x


def _scan_folder(folder: Path, root: str) -> ImageFolder:
    hint = f"put images in {root}/train/<class>/ and {root}/val/<class>/"
    if not folder.is_dir():
        raise FileNotFoundError(f"imagefolder: no directory {str(folder)!r}: {hint}")
    try:
        return ImageFolder(str(folder))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"imagefolder: {err} ({hint})") from None


def folder_data(
    cfg: DataConfig, spec: DatasetSpec, pil_augment: Callable | None, common: dict[str, Any]
) -> FolderData:
    """``imagefolder``: ``root/train`` split into train and val, ``root/val`` as test;
    ``common`` holds the keyword arguments of :class:`Data` (batch_size, seed, device, ...).

    Raises:
        ConfigError: the two folders hold different classes.
        FileNotFoundError: a folder is missing.
    """
    train_folder = _scan_folder(Path(cfg.root) / "train", cfg.root)
    test_folder = _scan_folder(Path(cfg.root) / "val", cfg.root)
    if test_folder.classes != train_folder.classes:
        raise ConfigError(
            f"imagefolder: class folders differ between {cfg.root}/train "
            f"({len(train_folder.classes)}) and {cfg.root}/val ({len(test_folder.classes)})"
        )
    seed = common["seed"]
    train_index, val_index = split_train(
        len(train_folder.samples), cfg.val_size, cfg.train_subset, seed, cfg.num_folds, cfg.fold
    )
    samples = train_folder.samples
    splits = {
        "train": [samples[i] for i in train_index],
        "val": [samples[i] for i in val_index],
        "test": list(test_folder.samples),
    }
    if cfg.calib_root is not None:
        # BN statistics from images the user chose (never the evaluation images)
        splits["calib"] = list(_scan_folder(Path(cfg.calib_root), cfg.calib_root).samples)
    return FolderData(
        cfg, spec, splits, train_folder.classes, train_folder.loader, pil_augment, **common
    )
