"""The data section's checks: each bad setting raises ConfigError, named with its value."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .config import CROPS, DataConfig
from .datasets import DATASETS, DatasetSpec
from .decode import check_decoder
from .images import BAD_IMAGE_POLICIES

__all__ = ["check_config", "check_for_dataset", "check_labels"]


def _field_checks(cfg: DataConfig) -> list[tuple[bool, str, str]]:
    """(holds, field, what it must be) for every field checked on its own."""
    return [
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


def check_config(cfg: DataConfig, batch_size: int, rank: int, world_size: int) -> None:
    """Check ``cfg`` on its own and the batch against the ranks.

    Raises:
        ConfigError: for the first bad setting.
    """
    if cfg.name not in DATASETS:
        raise ConfigError(f"unknown dataset {cfg.name!r}: use one of {list(DATASETS)}")
    for ok, field, want in _field_checks(cfg):
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


def check_for_dataset(cfg: DataConfig, spec: DatasetSpec) -> None:
    """Settings that depend on the dataset: lighting noise on RGB only; ``data.mean`` and
    ``data.std`` one number per channel (std > 0); ``calib_root`` only for image folders.

    Raises:
        ConfigError: for the first that does not fit ``spec``.
    """
    if cfg.pca_lighting > 0 and spec.in_chans != 3:
        raise ConfigError(
            f"data.pca_lighting={cfg.pca_lighting}: {cfg.name} has {spec.in_chans} channel(s), "
            "and the lighting noise is defined on RGB: set it to 0"
        )
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


def check_labels(name: str, labels: np.ndarray, num_classes: int) -> None:
    """Raise ConfigError when a label of dataset ``name`` is outside ``0..num_classes - 1``."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(
            f"{name}: labels span {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}"
        )
