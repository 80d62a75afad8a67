"""The data section of a training recipe."""

# OmegaConf evaluates these annotations at run time, and OmegaConf 2.3 (which pyproject allows)
# does not read ``int | None`` (2.4 does): keep ``Optional``.
# ruff: noqa: UP045

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["DataConfig", "CROPS"]

# Training crops: CIFAR-style random crop of the zero-padded image, random resized crop, none.
CROPS = ("pad", "rrc", "none")


@dataclass
class DataConfig:
    """What to train and evaluate on, and how to augment it.

    Plain types only: the trainer nests this into its recipe as an OmegaConf structured config.
    ``None`` in ``img_size``, ``crop``, ``crop_padding`` and ``hflip`` means the dataset's own
    default (see ``nestedtrain.data.datasets.SPECS``); the resolved values are attributes of
    the built ``Data``.
    """

    name: str = "digits"  # digits | fashion-mnist | cifar10 | cifar100 | imagefolder
    root: str = "data"  # torchvision root, or an imagefolder root holding train/ and val/
    download: bool = False  # let torchvision download the dataset into root
    train_subset: Optional[int] = None  # train on this many images, chosen after the val split
    val_size: float = 0.1  # fraction of train held out as a seeded validation split; 0 = none
    num_folds: int = 0  # k-fold cross-validation: >= 2 splits train into this many folds
    fold: int = 0  # ... and holds out fold `fold` as the validation split (val_size=0)
    img_size: Optional[int] = None  # training crop side; None = the dataset's native side
    test_img_size: Optional[int] = None  # evaluation side; None = img_size
    test_crop_pct: float = 0.875  # imagefolder eval: resize to test_img_size / pct, centre crop
    crop: Optional[str] = None  # pad | rrc | none; None = pad (small datasets), rrc (imagefolder)
    crop_padding: Optional[int] = None  # for crop=pad; None = 1 (digits), 4 (others)
    hflip: Optional[float] = None  # flip probability; None = 0 (digits), 0.5 (others)
    color_jitter: float = 0.0  # timm colour jitter strength (brightness, contrast, saturation)
    pca_lighting: float = 0.0  # AlexNet PCA lighting noise, std of its weights (RGB); 0 = off
    # timm string ("rand-m9-mstd0.5", ...), "trivialaugment" or "uniformaugment"
    auto_augment: Optional[str] = None
    reprob: float = 0.0  # timm RandomErasing probability
    mixup: float = 0.0  # timm Mixup alpha
    cutmix: float = 0.0  # timm CutMix alpha
    mixup_prob: float = 1.0  # probability of mixing a batch
    label_smoothing: float = 0.0  # folded into the soft targets when mixing
    # DataLoader workers for on-disk datasets; None: this node's CPUs per rank, less one (<= 16)
    num_workers: Optional[int] = None
    # imagefolder JPEG decoding: pil (in the workers) | torchcodec (TorchCodec's decode_jpeg
    # where the model runs: nvJPEG on CUDA; torchvision's where TorchCodec is missing; its old
    # name torchvision means the same) | dali (NVIDIA DALI, the [dali] extra)
    decoder: str = "pil"
    on_device: Optional[bool] = None  # keep the images on the device; None = small datasets only
    calib_images: int = 2000  # training images for BatchNorm re-calibration
    bad_images: str = "skip"  # imagefolder, an image that does not decode: skip | error
    max_bad_fraction: float = 0.001  # skip: stop when more than this fraction is bad
    # Normalisation per channel, of images scaled to [0, 1]; None = the dataset's own (a model
    # trained elsewhere brings its own, e.g. from timm's pretrained config).
    mean: Optional[Any] = None
    std: Optional[Any] = None
    # imagefolder: re-estimate BN statistics from the images of this tree of class folders
    # instead of the training split; None = the training split.
    calib_root: Optional[str] = None
