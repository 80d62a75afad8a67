"""``build_data``: a dataset, its splits and its augmentation as batches on the device.

Two ways to feed batches, one interface (``Data``):

- small datasets (digits, Fashion-MNIST, CIFAR) live on the device as uint8 tensors and are
  augmented a whole batch at a time with tensor ops, airbench-style: no loader workers;
- ``imagefolder`` is read from disk by DataLoader workers with timm's per-image transforms up
  to a uint8 tensor; normalisation, lighting noise and erasing run on the device, a batch at a
  time (on CUDA one batch ahead, on a side stream).

Every random choice is a function of the run's seed: the split, the train subset and the
calibration images of ``seed``; an epoch's order of ``(seed, epoch)``; its augmentation of
``(seed, epoch, rank)`` (imagefolder's per-image crops, flips and PIL augmentations: of
``(seed, epoch)`` and the image's place in the epoch, so that they do not depend on the number
of workers).
"""

from __future__ import annotations

import abc
import atexit
import functools
import os
import signal
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import ImageFolder

from ..errors import ConfigError
from .config import CROPS, DataConfig
from .datasets import DATASETS, SPECS, DatasetSpec, load_arrays
from .decode import (
    BatchDecoder,
    EncodedSamples,
    check_decoder,
    collate_encoded,
    make_decode,
    pil_sample,
)
from .images import BAD_IMAGE_POLICIES, BadImages
from .transforms import (
    apply_pil_transform,
    build_pil_augment,
    folder_eval_transform,
    folder_train_transform,
    host_rng_scope,
    make_generator,
    normalize,
    pca_lighting_offset,
    random_pad_crop_flip,
    random_resized_crop_flip,
    resize,
    to_device,
    to_uint8,
)

__all__ = ["Data", "build_data"]

# Tags that keep the random streams drawn from one seed apart.
_SPLIT, _SHUFFLE, _AUGMENT, _SAMPLE, _CALIB, _LIGHTING = range(6)
_SPLITS = ("test", "val")


@dataclass(frozen=True)
class _Sharding:
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
        # One permutation per epoch for all ranks; step s takes global batch s of it and each
        # rank its own contiguous slice, so the ranks' batches make up the one-rank batch.
        order = torch.randperm(self.n_train, generator=make_generator(self.seed, epoch, _SHUFFLE))
        local = self.batch_size // self.world_size
        for step in range(start, self.steps):
            start = step * self.batch_size + self.rank * local
            yield order[start : start + local]


def _build_mixup(cfg: DataConfig, num_classes: int, local_batch_size: int) -> Mixup | None:
    """timm's Mixup/CutMix as ``cfg`` sets it, or ``None`` when both are off.

    Raises:
        ConfigError: an odd per-rank batch, which Mixup/CutMix cannot pair.
    """
    if not (cfg.mixup > 0 or cfg.cutmix > 0):
        return None
    if local_batch_size % 2:
        raise ConfigError(
            f"per-rank batch {local_batch_size} is odd: timm's Mixup/CutMix pairs "
            "images, so use an even batch_size // world_size"
        )
    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        prob=cfg.mixup_prob,
        label_smoothing=cfg.label_smoothing,
        num_classes=num_classes,
    )


class Data(abc.ABC):
    """A dataset's splits as batches on the device, sharded over ranks.

    Attributes:
        num_classes, in_chans, classes: what the model sees and predicts.
        img_size, test_img_size: training crop side, evaluation side.
        n_train, n_val, n_test: images per split (whole split, all ranks together).
        mean, std: normalisation applied to every batch, of images scaled to [0, 1].
        crop, crop_padding, hflip: the training crop and flip in effect (defaults resolved).
        batch_size, local_batch_size: global batch, and each rank's share of it.
        steps_per_epoch: steps of every rank per epoch (the last partial batch is dropped).
        mixup_active: whether training labels are soft targets ``(N, num_classes)``.
    """

    def __init__(
        self,
        cfg: DataConfig,
        spec: DatasetSpec,
        *,
        classes: Sequence[str],
        n_train: int,
        n_val: int,
        n_test: int,
        batch_size: int,
        seed: int,
        device: torch.device,
        rank: int,
        world_size: int,
    ):
        self.cfg = cfg
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.in_chans = spec.in_chans
        self.mean = tuple(spec.mean if cfg.mean is None else cfg.mean)
        self.std = tuple(spec.std if cfg.std is None else cfg.std)
        self.img_size = cfg.img_size or spec.native_size
        self.test_img_size = cfg.test_img_size or self.img_size
        self.crop = cfg.crop or spec.crop
        self.crop_padding = spec.crop_padding if cfg.crop_padding is None else cfg.crop_padding
        self.hflip = spec.hflip if cfg.hflip is None else cfg.hflip
        self.n_train, self.n_val, self.n_test = n_train, n_val, n_test
        self.n_calib = n_train  # images BN re-calibration draws from (data.calib_root: its own)
        self.batch_size = batch_size
        self.local_batch_size = batch_size // world_size
        self.seed, self.device, self.rank, self.world_size = seed, device, rank, world_size
        if batch_size > n_train:
            raise ConfigError(
                f"batch_size={batch_size} is larger than the {n_train} training images: "
                "use a smaller batch or more data"
            )
        self._sharding = _Sharding(n_train, batch_size, rank, world_size, seed)
        # Image files that did not decode (only image folders have any).
        self.bad_images = BadImages(
            cfg.bad_images, cfg.max_bad_fraction, n_train + n_val + n_test, cfg.root
        )
        self.steps_per_epoch = self._sharding.steps
        self._mixup = _build_mixup(cfg, self.num_classes, self.local_batch_size)
        self.mixup_active = self._mixup is not None

        self._lighting = cfg.pca_lighting
        self._std = torch.tensor(self.std).to(self.device)
        # timm's RandomErasing loops over the batch, its boxes from Python's RNG and its noise
        # drawn on the batch's device, both seeded by the host RNG scope.
        self._erase = (
            RandomErasing(cfg.reprob, mode="pixel", device=self.device) if cfg.reprob > 0 else None
        )

    def _finish(self, x: torch.Tensor, lighting_seed: int, erase_seed: int) -> torch.Tensor:
        """The float end of the training transform, on a uint8 batch on the device, in timm's
        order: normalise, (lighting noise,) erase."""
        x = normalize(x, self.mean, self.std)
        if self._lighting > 0:
            x = self._add_lighting(x, lighting_seed)
        if self._erase is not None:
            with host_rng_scope(erase_seed, x.device):
                self._erase(x)
        return x

    def _add_lighting(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """PCA lighting noise on the normalised batch: the [0, 1] offset divided by std.

        By hand: neither timm nor torchvision has AlexNet's lighting noise."""
        alpha = torch.randn(len(x), 3, generator=make_generator(seed, _LIGHTING))
        offset = to_device(pca_lighting_offset(alpha * self._lighting), x.device)
        return x + (offset / self._std).view(len(x), 3, 1, 1)

    @abc.abstractmethod
    def train_batches(
        self, epoch: int, start: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's augmented training batches of ``epoch``, from step ``start`` on.

        ``steps_per_epoch - start`` batches, each exactly the one an iteration from step 0
        yields at that step (so a run resumed mid-epoch sees the same images, augmented alike).
        Yields float32 normalised images ``(local_batch_size, C, img_size, img_size)`` and
        int64 labels, or float soft targets ``(N, num_classes)`` when ``mixup_active``.
        """

    def eval_batches(
        self, split: str = "test", batch_size: int = 512
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's contiguous shard of ``split`` ("test" or "val"), unaugmented, in order.

        Over all ranks every image comes exactly once, so summed counts are exact.

        Raises:
            ConfigError: for an unknown split, or "val" when no validation split is held out.
        """
        if split not in _SPLITS:
            raise ConfigError(f"unknown split {split!r}: use one of {list(_SPLITS)}")
        if split == "val" and self.n_val == 0:
            raise ConfigError(
                "no validation split is held out (data.val_size=0): set data.val_size > 0"
            )
        n = self.n_test if split == "test" else self.n_val
        start, end = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
        return self._eval_batches(split, start, end, batch_size)

    def calibration_batches(
        self, num_images: int | None = None, batch_size: int = 256
    ) -> Iterator[torch.Tensor]:
        """Training images with the evaluation transform, for BatchNorm re-calibration.

        The first ``num_images`` (default ``cfg.calib_images``, at most ``n_train``) of a
        permutation fixed by the seed: the same images on every call and every rank.
        """
        count = self.cfg.calib_images if num_images is None else num_images
        if count < 1:
            raise ConfigError(f"num_images={count}: calibration needs at least one image")
        order = torch.randperm(self.n_calib, generator=make_generator(self.seed, _CALIB))
        return self._calibration_batches(order[: min(count, self.n_calib)], batch_size)

    @abc.abstractmethod
    def _eval_batches(
        self, split: str, start: int, end: int, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Images ``start:end`` of ``split``, evaluation transform, on the device."""

    @abc.abstractmethod
    def _calibration_batches(self, index: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
        """Training images ``index`` with the evaluation transform, on the device."""

    def close(self) -> None:
        """Stop the loader workers this object keeps (an image folder's persistent training
        workers); nothing to do for tensor datasets. Also done when it is garbage collected
        and at interpreter exit; iterating again starts new workers."""

    def _mix(
        self, images: torch.Tensor, labels: torch.Tensor, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._mixup is None:
            return images, labels
        with host_rng_scope(seed):
            return self._mixup(images, labels)


class _TensorData(Data):
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
        generator = make_generator(self.seed, epoch, self.rank, _AUGMENT)
        for step, index in enumerate(self._sharding.rank_batches(epoch)):
            index = to_device(index, images.device)
            x = images[index].to(self.device, non_blocking=True)
            pil_seed, erase_seed, mix_seed = torch.randint(
                2**62, (3,), generator=generator
            ).tolist()
            if step < start:
                # A skipped batch still draws its crops and flips, so that the generator is
                # where an uninterrupted epoch has it at ``start``; the rest draws from seeds.
                self._crop_flip(x, generator)
                continue
            y = labels[index].to(self.device, non_blocking=True)
            x = self._augment(x, generator, pil_seed, erase_seed)
            yield self._mix(x, y, mix_seed)

    def _crop_flip(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.crop == "rrc":
            return random_resized_crop_flip(x, self.img_size, self.hflip, generator)
        if x.shape[-1] != self.img_size:
            x = to_uint8(resize(x, self.img_size))
        padding = self.crop_padding if self.crop == "pad" else 0
        return random_pad_crop_flip(x, padding, self.hflip, generator)

    def _augment(
        self, x: torch.Tensor, generator: torch.Generator, pil_seed: int, erase_seed: int
    ) -> torch.Tensor:
        x = self._crop_flip(x, generator)
        if self._pil_augment is not None:
            x = apply_pil_transform(x, self._pil_augment, pil_seed)
        return self._finish(x, pil_seed, erase_seed)

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


class _FolderSamples(Dataset):
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


# The loaders whose persistent workers must be stopped at interpreter exit, if still alive.
_PERSISTENT: weakref.WeakSet[DataLoader] = weakref.WeakSet()


def _stop_at_exit(loader: DataLoader) -> None:
    """Stop ``loader``'s workers at interpreter exit, should it still be alive then.

    atexit calls its functions last registered first, and multiprocessing registered its own
    when torch loaded: the first registration here runs before it. Its handler sends daemonic
    children SIGTERM, which our workers ignore, and then joins them: without this, a script
    that still holds a folder ``Data`` when it ends (the README's own loop) never exits.
    """
    if not _PERSISTENT:
        atexit.unregister(_stop_persistent)  # registered once, however many Data are built
        atexit.register(_stop_persistent)
    _PERSISTENT.add(loader)


def _stop_persistent() -> None:
    for loader in list(_PERSISTENT):
        _stop_workers(loader)


def _stop_workers(loader: DataLoader) -> None:
    """End ``loader``'s persistent workers now, as its iterator's collection would.

    By hand because torch has no public call for it: DataLoader keeps the iterator of
    persistent workers in ``_iterator`` and stops them in its ``_shutdown_workers`` (asks
    each worker to leave, joins it, terminates what is left), also run when it is collected.
    """
    iterator, loader._iterator = getattr(loader, "_iterator", None), None
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def _ignore_stop_signals(worker_id: int, parent: int) -> None:
    """A DataLoader worker outlives SIGTERM and SIGUSR1: the main process decides on them.

    torch's workers die on SIGTERM (a C handler prints and re-raises it), and a scheduler
    sends it to every process of a job: the dead worker would end the main process mid-step
    with a traceback, before it can write its checkpoint. The main process ends its workers
    itself on the way out (:func:`_stop_workers`), and they leave by themselves when it is
    gone (:func:`_leave_with_parent`).
    """
    for name in ("SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    threading.Thread(target=_leave_with_parent, args=(parent,), daemon=True).start()


def _leave_with_parent(parent: int, every: float = 0.5) -> None:
    """End this worker within ``every`` seconds of the death of its main process (pid
    ``parent``: SIGKILL, a crash), which no signal can tell it since it ignores them.

    torch's worker loop notices a dead parent too, every 5 s, but then exits through
    multiprocessing's teardown, which waits for its result queue's feeder thread; the
    queue's pipe is held open by the other workers, so that wait can last forever (seen: 1
    run in 4 left the workers alive). ``os._exit`` skips it: nobody is left to read.
    """
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(0)


class _TrainBatchSampler(Sampler):
    """Yields this rank's ``(index, seed)`` lists, the same sharding as the on-device path."""

    def __init__(self, sharding: _Sharding):
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
            2**62, (sharding.n_train,), generator=make_generator(sharding.seed, self.epoch, _SAMPLE)
        )
        for index in sharding.rank_batches(self.epoch, self.start):
            # A sample's seed follows the image, so it is the same for any number of ranks.
            yield list(zip(index.tolist(), seeds[index].tolist()))


class _FolderData(Data):
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
        self._stop = weakref.finalize(self, _stop_workers, self._train_loader)
        _stop_at_exit(self._train_loader)

    def close(self) -> None:
        _stop_workers(self._train_loader)

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
            dataset: Dataset = _FolderSamples(samples, self._loader, transform)
            collate = None
        else:
            dataset, collate = EncodedSamples(samples, self._loader, transform), collate_encoded
        loader = DataLoader(
            dataset, collate_fn=collate, **batching, **self._loader_options(persistent)
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

    def _loader_options(self, persistent: bool = False) -> dict[str, Any]:
        workers = self._workers
        return dict(
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=persistent and workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            # The loader draws its worker base seed from this, not from torch's global RNG.
            generator=make_generator(self.seed, _SAMPLE),
            # the main process's pid, taken here: a worker that starts after its death would
            # read its new parent's
            worker_init_fn=functools.partial(_ignore_stop_signals, parent=os.getpid()),
        )

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
        # so starting at ``start`` reads no skipped image; only the mix seeds are drawn.
        self._train_sampler.set_epoch(epoch, start)
        generator = make_generator(self.seed, epoch, self.rank, _AUGMENT)
        for _ in range(start):
            torch.randint(2**62, (3,), generator=generator)

        def prepare(batch: Any):
            x, y = self._train_unpack(batch)
            mix_seed, lighting_seed, erase_seed = torch.randint(
                2**62, (3,), generator=generator
            ).tolist()
            return self._mix(self._finish(x, lighting_seed, erase_seed), y, mix_seed)

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


def default_workers() -> int:
    """DataLoader workers when ``data.num_workers`` is None: the CPUs this process may use,
    shared by the ranks of this node (torchrun's LOCAL_WORLD_SIZE), less one for the main
    process, at least 1 and at most 16."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per_rank = (cpus or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(16, per_rank - 1))


def ahead_on_device(
    batches: Iterable[Any], prepare: Callable[[Any], tuple[torch.Tensor, ...]], device: torch.device
) -> Iterator[tuple[torch.Tensor, ...]]:
    """``prepare(batch)`` of each batch (its copy to ``device`` and the work there), in order.

    On CUDA the next batch is prepared on a side stream while the current one is used, as
    timm's PrefetchLoader does: its host-to-device copy and normalisation overlap the step.
    The device JPEG decoders run in ``prepare`` on the side stream too; ``BatchDecoder`` waits
    for that stream before each decode (a decoder may write outside stream order), and the
    main stream's use of a batch is ordered by ``wait_stream`` and ``record_stream`` below.
    """
    if device.type != "cuda":
        yield from map(prepare, batches)
        return
    side, main = torch.cuda.Stream(device), torch.cuda.current_stream(device)
    iterator = iter(batches)

    def next_ready():
        batch = next(iterator, None)
        if batch is None:
            return None
        with torch.cuda.stream(side):
            return prepare(batch)

    ready = next_ready()
    while ready is not None:
        main.wait_stream(side)
        for tensor in ready:
            tensor.record_stream(main)  # made on the side stream, freed after main's use
        current, ready = ready, next_ready()
        yield current


def _check_config(cfg: DataConfig, batch_size: int, rank: int, world_size: int) -> None:
    if cfg.name not in DATASETS:
        raise ConfigError(f"unknown dataset {cfg.name!r}: use one of {list(DATASETS)}")
    checks = [
        (
            cfg.train_subset is None or cfg.train_subset > 0,
            "train_subset",
            "a positive count or None",
        ),
        (0 <= cfg.val_size < 1, "val_size", "a fraction in [0, 1)"),
        (cfg.num_folds == 0 or cfg.num_folds >= 2, "num_folds", "0 (off) or at least 2"),
        (
            cfg.num_folds == 0 or 0 <= cfg.fold < cfg.num_folds,
            "fold",
            f"a fold index in 0..{cfg.num_folds - 1}",
        ),
        (cfg.num_folds == 0 or cfg.val_size == 0, "val_size", "0 when num_folds holds out a fold"),
        (cfg.img_size is None or cfg.img_size > 0, "img_size", "a positive side or None"),
        (
            cfg.test_img_size is None or cfg.test_img_size > 0,
            "test_img_size",
            "a positive side or None",
        ),
        (0 < cfg.test_crop_pct <= 1, "test_crop_pct", "in (0, 1]"),
        (cfg.crop is None or cfg.crop in CROPS, "crop", f"one of {list(CROPS)} or None"),
        (cfg.crop_padding is None or cfg.crop_padding >= 0, "crop_padding", ">= 0 or None"),
        (cfg.hflip is None or 0 <= cfg.hflip <= 1, "hflip", "a probability or None"),
        (cfg.color_jitter >= 0, "color_jitter", ">= 0"),
        (cfg.pca_lighting >= 0, "pca_lighting", ">= 0 (0 = off)"),
        (0 <= cfg.reprob <= 1, "reprob", "a probability"),
        (cfg.mixup >= 0, "mixup", ">= 0"),
        (cfg.cutmix >= 0, "cutmix", ">= 0"),
        (0 <= cfg.mixup_prob <= 1, "mixup_prob", "a probability"),
        (0 <= cfg.label_smoothing < 1, "label_smoothing", "in [0, 1)"),
        (cfg.num_workers is None or cfg.num_workers >= 0, "num_workers", ">= 0 or None (auto)"),
        (cfg.calib_images >= 1, "calib_images", ">= 1"),
        (cfg.bad_images in BAD_IMAGE_POLICIES, "bad_images", f"one of {list(BAD_IMAGE_POLICIES)}"),
        (0 <= cfg.max_bad_fraction <= 1, "max_bad_fraction", "a fraction in [0, 1]"),
    ]
    for ok, field, want in checks:
        if not ok:
            raise ConfigError(f"data.{field}={getattr(cfg, field)!r}: must be {want}")
    check_decoder(cfg.name, cfg.decoder, cfg.auto_augment)
    if cfg.name == "imagefolder" and cfg.on_device:
        raise ConfigError(
            "data.on_device=true: imagefolder is read from disk by workers; leave on_device unset"
        )
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
    if batch_size < 1 or batch_size % world_size:
        raise ConfigError(
            f"batch_size={batch_size}: the global batch must be a positive multiple of "
            f"world_size={world_size}"
        )


def _split_train(
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
    """
    order = torch.randperm(n, generator=make_generator(seed, _SPLIT)).numpy()
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


def _check_labels(name: str, labels: np.ndarray, num_classes: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(
            f"{name}: labels span {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}"
        )


def _scan_folder(folder: Path, root: str) -> ImageFolder:
    hint = f"put images in {root}/train/<class>/ and {root}/val/<class>/"
    if not folder.is_dir():
        raise FileNotFoundError(f"imagefolder: no directory {str(folder)!r}: {hint}")
    try:
        return ImageFolder(str(folder))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"imagefolder: {err} ({hint})") from None


def build_data(
    cfg: DataConfig,
    *,
    batch_size: int,
    seed: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> Data:
    """Load ``cfg.name``, split it and return its batches for this rank.

    Args:
        cfg: the data section of the recipe.
        batch_size: the global batch; each rank yields ``batch_size // world_size`` images.
        seed: fixes the validation split, train subset, order and augmentation.
        device: where batches are yielded (and small datasets are stored).
        rank, world_size: this process's place among the data-parallel processes.

    Raises:
        ConfigError: for a bad setting (named with its value).
        FileNotFoundError: when the dataset is not on disk, saying how to get it.
    """
    _check_config(cfg, batch_size, rank, world_size)
    device = torch.device(device)
    spec = SPECS[cfg.name]
    img_size = cfg.img_size or spec.native_size
    if cfg.pca_lighting > 0 and spec.in_chans != 3:
        raise ConfigError(
            f"data.pca_lighting={cfg.pca_lighting}: {cfg.name} has {spec.in_chans} channel(s), "
            "and the lighting noise is defined on RGB: set it to 0"
        )
    _check_normalisation(cfg, spec)
    pil_augment = build_pil_augment(cfg.auto_augment, cfg.color_jitter, img_size, spec.mean)
    common = dict(batch_size=batch_size, seed=seed, device=device, rank=rank, world_size=world_size)
    if cfg.name == "imagefolder":
        return _folder_data(cfg, spec, pil_augment, common)
    return _tensor_data(cfg, spec, pil_augment, common)


def _check_normalisation(cfg: DataConfig, spec: DatasetSpec) -> None:
    """``data.mean``/``data.std``: one number per channel (std > 0); ``calib_root`` only
    for image folders."""
    for field, values in (("mean", cfg.mean), ("std", cfg.std)):
        if values is None:
            continue
        numbers = list(values)
        if len(numbers) != spec.in_chans or (field == "std" and min(numbers) <= 0):
            raise ConfigError(
                f"data.{field}={numbers}: give {spec.in_chans} number(s), one per channel of "
                f"{cfg.name}" + (", each > 0" if field == "std" else "")
            )
    if cfg.calib_root is not None and cfg.name != "imagefolder":
        raise ConfigError(
            f"data.calib_root={cfg.calib_root!r}: calibration folders are for image folders; "
            f"{cfg.name} re-estimates BN statistics from its own training split"
        )


def _folder_data(
    cfg: DataConfig, spec: DatasetSpec, pil_augment: Callable | None, common: dict[str, Any]
) -> _FolderData:
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
    train_index, val_index = _split_train(
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
    return _FolderData(
        cfg, spec, splits, train_folder.classes, train_folder.loader, pil_augment, **common
    )


def _tensor_data(
    cfg: DataConfig, spec: DatasetSpec, pil_augment: Callable | None, common: dict[str, Any]
) -> _TensorData:
    """A dataset held as tensors: its training split divided into train and val, its test
    split as test, stored on ``common["device"]`` unless ``cfg.on_device`` is false;
    ``common`` holds the keyword arguments of :class:`Data` (batch_size, seed, device, ...).

    Raises:
        ConfigError: labels outside the dataset's classes.
        FileNotFoundError: the dataset is not on disk (and not downloaded).
    """
    arrays = load_arrays(cfg.name, cfg.root, cfg.download)
    _check_labels(cfg.name, arrays.train_labels, len(arrays.classes))
    _check_labels(cfg.name, arrays.test_labels, len(arrays.classes))
    seed = common["seed"]
    train_index, val_index = _split_train(
        len(arrays.train_labels), cfg.val_size, cfg.train_subset, seed, cfg.num_folds, cfg.fold
    )
    splits = {
        "train": (arrays.train_images[train_index], arrays.train_labels[train_index]),
        "val": (arrays.train_images[val_index], arrays.train_labels[val_index]),
        "test": (arrays.test_images, arrays.test_labels),
    }
    on_device = True if cfg.on_device is None else cfg.on_device
    storage = common["device"] if on_device else torch.device("cpu")
    return _TensorData(cfg, spec, splits, arrays.classes, pil_augment, storage=storage, **common)
