"""``Data``: one interface to a dataset's splits as batches on the device, for both paths.

Small datasets (digits, Fashion-MNIST, CIFAR) take the tensor path (``tensor.py``): they live
on the device as uint8 tensors and are augmented a whole batch at a time with tensor ops,
airbench-style, no loader workers. ``imagefolder`` takes the folder path (``folder.py``): it
is read from disk by DataLoader workers with timm's per-image transforms up to a uint8 tensor.
Both end alike, here: normalisation, lighting noise, erasing and mixing run on the device, a
batch at a time, seeded by the batch's :class:`~nestedtrain.data.seeding.BatchSeeds`.

Every random choice is a function of the run's seed: the split, the train subset and the
calibration images of ``seed``; an epoch's order of ``(seed, epoch)``; its augmentation of
``(seed, epoch, rank)`` (imagefolder's per-image crops, flips and PIL augmentations: of
``(seed, epoch)`` and the image's place in the epoch, so that they do not depend on the number
of workers).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence

import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing

from ..errors import ConfigError
from .config import DataConfig
from .datasets import DatasetSpec
from .images import BadImages
from .partition import Sharding
from .seeding import CALIB, LIGHTING, BatchSeeds, host_rng_scope, make_generator
from .transforms import normalize, pca_lighting_offset, to_device

__all__ = ["Data"]

_SPLITS = ("test", "val")


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
        self._sharding = Sharding(n_train, batch_size, rank, world_size, seed)
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

    def _finish(
        self, x: torch.Tensor, y: torch.Tensor, seeds: BatchSeeds
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The float end of the training transform, on a uint8 batch and its labels on the
        device, in timm's order: normalise, (lighting noise,) erase, (mix)."""
        x = normalize(x, self.mean, self.std)
        if self._lighting > 0:
            x = self._add_lighting(x, seeds.photometric)
        if self._erase is not None:
            with host_rng_scope(seeds.erase, x.device):
                self._erase(x)
        if self._mixup is None:
            return x, y
        with host_rng_scope(seeds.mix):
            return self._mixup(x, y)

    def _add_lighting(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """PCA lighting noise on the normalised batch: the [0, 1] offset divided by std.

        By hand: neither timm nor torchvision has AlexNet's lighting noise."""
        alpha = torch.randn(len(x), 3, generator=make_generator(seed, LIGHTING))
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
        order = torch.randperm(self.n_calib, generator=make_generator(self.seed, CALIB))
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
