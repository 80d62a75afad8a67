"""Where each dataset comes from: its files, its properties, and readers for the small ones.

The small datasets (digits, Fashion-MNIST, CIFAR) are read whole into uint8 arrays
``(N, C, H, W)`` so that they can live on the device; ``imagefolder`` stays on disk and is
read by DataLoader workers (see ``folder.py``). ``SPECS`` is the one registry of datasets.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import datasets as tv_datasets

from ..errors import ConfigError

__all__ = [
    "DATASETS",
    "FASHION_MNIST_SYSTEM_DIR",
    "SPECS",
    "ArrayDataset",
    "DatasetSpec",
    "load_arrays",
    "read_idx",
]

# Where the Debian package dataset-fashion-mnist puts the original idx files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is, and the augmentation defaults that suit it."""

    native_size: int  # side of the stored images (imagefolder: the default crop side)
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop: str
    crop_padding: int
    hflip: float


SPECS = {
    # Mean and std of the pixels scaled to [0, 1]: the usual training-set values (digits: all
    # 1,797 images; imagefolder: ImageNet's, as timm's pretrained models expect).
    # Flipping a digit makes another symbol, so digits are not flipped by default.
    "digits": DatasetSpec(8, 1, (0.3053,), (0.3759,), "pad", 1, 0.0),
    "fashion-mnist": DatasetSpec(28, 1, (0.2860,), (0.3530,), "pad", 4, 0.5),
    "cifar10": DatasetSpec(
        32, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "pad", 4, 0.5
    ),
    "cifar100": DatasetSpec(
        32, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "pad", 4, 0.5
    ),
    "imagefolder": DatasetSpec(224, 3, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "rrc", 4, 0.5),
}
# The datasets' names, in the registry's order.
DATASETS = tuple(SPECS)


class ArrayDataset(NamedTuple):
    """A dataset held in memory: uint8 images ``(N, C, H, W)`` and int64 labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]


def load_arrays(name: str, root: str, download: bool = False) -> ArrayDataset:
    """Read one of the small datasets whole.

    Raises:
        FileNotFoundError: when the dataset is not on disk and ``download`` is off.
        ConfigError: when ``name`` is not an in-memory dataset.
    """
    if name == "digits":
        return _load_digits()
    if name == "fashion-mnist":
        return _load_fashion_mnist(Path(root), download)
    if name in ("cifar10", "cifar100"):
        return _load_cifar(name, Path(root), download)
    raise ConfigError(
        f"dataset {name!r} is not held in memory: use one of "
        f"{[n for n in DATASETS if n != 'imagefolder']}"
    )


def _load_digits() -> ArrayDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # Pixel values are 0..16; stretch them to the uint8 range every other dataset uses.
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    # sklearn ships one set; the test split is fixed (seed 0, stratified) so that every run,
    # whatever its seed, is tested on the same 360 images.
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=0.2, random_state=0, stratify=labels
    )
    return ArrayDataset(train_x, train_y, test_x, test_y, [str(d) for d in range(10)])


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (the MNIST format; gzipped when its name ends in .gz) of unsigned bytes.

    Raises:
        ConfigError: when the file is not an idx file of unsigned bytes.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    # Header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions,
    # then one big-endian uint32 per dimension.
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ConfigError(f"{str(path)!r} is not an idx file of unsigned bytes (magic {raw[:4]!r})")
    ndim = raw[3]
    shape = tuple(np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ConfigError(
            f"{str(path)!r} holds {data.size} bytes of data, its header says shape {shape}"
        )
    return data.reshape(shape).copy()  # frombuffer is read-only; torch wants writable arrays


_FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
_FMNIST_TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _load_fashion_mnist(root: Path, download: bool) -> ArrayDataset:
    # The user's root first (torchvision's layout, or the bare files), then the Debian package.
    folders = [root / "FashionMNIST" / "raw", root / "fashion-mnist", FASHION_MNIST_SYSTEM_DIR]
    stems = _FMNIST_FILES + _FMNIST_TEST_FILES

    def complete(folder: Path) -> bool:
        return all(_find_idx(folder, stem) is not None for stem in stems)

    found = next((folder for folder in folders if complete(folder)), None)
    if found is None and download:
        tv_datasets.FashionMNIST(str(root), train=True, download=True)
        found = folders[0] if complete(folders[0]) else None
    if found is None:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {[str(f) for f in folders]}: install the Debian package "
            "dataset-fashion-mnist, set data.download=true on a machine with internet, or put "
            f"the four idx files in {str(folders[0])!r}"
        )
    arrays = [read_idx(_find_idx(found, stem)) for stem in stems]
    train_x, train_y, test_x, test_y = arrays
    return ArrayDataset(
        train_x[:, None],
        train_y.astype(np.int64),
        test_x[:, None],
        test_y.astype(np.int64),
        list(tv_datasets.FashionMNIST.classes),
    )


def _read_cifar_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    labels = entry["labels"] if "labels" in entry else entry["fine_labels"]
    images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return images, np.asarray(labels, dtype=np.int64)


def _load_cifar(name: str, root: Path, download: bool) -> ArrayDataset:
    # torchvision names the files; we read them ourselves because its dataset classes check
    # every file's md5, which rejects the small files of the same format the tests write (and
    # hashes 160 MB on every start). A real download still goes through torchvision, which
    # verifies the archive.
    tv_class = tv_datasets.CIFAR10 if name == "cifar10" else tv_datasets.CIFAR100
    folder = root / tv_class.base_folder
    train_files = [folder / f for f, _ in tv_class.train_list]
    test_files = [folder / f for f, _ in tv_class.test_list]
    meta_file = folder / tv_class.meta["filename"]
    needed = train_files + test_files + [meta_file]
    if download and not all(p.is_file() for p in needed):
        tv_class(str(root), train=True, download=True)
    missing = [p for p in needed if not p.is_file()]
    if missing:
        label = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
        raise FileNotFoundError(
            f"{label} not found under {str(root)!r} (no {str(missing[0])!r}): set "
            f"data.download=true on a machine with internet, or put the extracted "
            f"{tv_class.base_folder} folder there"
        )
    train = [_read_cifar_file(p) for p in train_files]
    test = [_read_cifar_file(p) for p in test_files]
    with open(meta_file, "rb") as f:
        classes = list(pickle.load(f, encoding="latin1")[tv_class.meta["key"]])
    return ArrayDataset(
        np.concatenate([x for x, _ in train]),
        np.concatenate([y for _, y in train]),
        np.concatenate([x for x, _ in test]),
        np.concatenate([y for _, y in test]),
        classes,
    )
