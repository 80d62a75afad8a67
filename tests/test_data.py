"""nestedtrain.data: datasets, splits, sharding, determinism and augmentation, on tiny data."""

from __future__ import annotations

import gzip
import os
import pickle
import random
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nestedtrain.data import DATASETS, DataConfig, build_data, datasets
from nestedtrain.data.datasets import FASHION_MNIST_SYSTEM_DIR, SPECS
from nestedtrain.data.transforms import random_resized_crop_flip

CPU = torch.device("cpu")
# No augmentation at all: batches are the stored images, normalised.
PLAIN = dict(crop="none", hflip=0.0)


def build(cfg: DataConfig, batch_size: int = 32, seed: int = 0, **kwargs):
    return build_data(cfg, batch_size=batch_size, seed=seed, device=CPU, **kwargs)


def to_pixels(data, images: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation: uint8 pixels of a batch."""
    mean = torch.tensor(data.mean).view(1, -1, 1, 1) * 255
    std = torch.tensor(data.std).view(1, -1, 1, 1) * 255
    return (images * std + mean).round().clamp(0, 255).to(torch.uint8)


def all_train(data, epoch: int = 0):
    xs, ys = zip(*data.train_batches(epoch))
    return torch.cat(xs), torch.cat(ys)


def all_eval(data, split: str = "test", batch_size: int = 512):
    xs, ys = zip(*data.eval_batches(split, batch_size=batch_size))
    return torch.cat(xs), torch.cat(ys)


def as_rows(pixels: torch.Tensor) -> set[bytes]:
    return {image.numpy().tobytes() for image in pixels}


# ---------------------------------------------------------------- tiny files in the real formats


def write_cifar(
    root: Path, name: str, per_file: int = 10, identical: bool = False
) -> dict[str, np.ndarray]:
    """CIFAR-10 (5 train batches + test) or CIFAR-100 (train + test) pickles of random images.

    ``identical``: every image the same one, so that any difference comes from augmentation.
    """
    rng = np.random.default_rng(0)
    classes = 10 if name == "cifar10" else 100
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    files = [f"data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else ["train"]
    written: dict[str, list] = {"train_x": [], "train_y": [], "test_x": [], "test_y": []}
    for split, names in (
        ("train", files),
        ("test", ["test_batch" if name == "cifar10" else "test"]),
    ):
        for file in names:
            data = rng.integers(0, 256, (1 if identical else per_file, 3072), dtype=np.uint8)
            data = np.repeat(data, per_file // len(data), axis=0)
            labels = rng.integers(0, classes, per_file).tolist()
            key = "labels" if name == "cifar10" else "fine_labels"
            entry = {"data": data, key: labels, "filenames": [f"{i}.png" for i in range(per_file)]}
            if name == "cifar100":
                entry["coarse_labels"] = [label // 5 for label in labels]
            with open(folder / file, "wb") as f:
                pickle.dump(entry, f)
            written[f"{split}_x"].append(data.reshape(-1, 3, 32, 32))
            written[f"{split}_y"].append(np.asarray(labels))
    meta_name, key = (
        ("batches.meta", "label_names") if name == "cifar10" else ("meta", "fine_label_names")
    )
    with open(folder / meta_name, "wb") as f:
        pickle.dump({key: [f"class{i}" for i in range(classes)]}, f)
    return {k: np.concatenate(v) for k, v in written.items()}


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_image_tree(root: Path, per_class: dict[str, int], size: int = 40) -> None:
    rng = np.random.default_rng(1)
    for split, count in per_class.items():
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.fixture()
def cifar10_root(tmp_path: Path) -> tuple[str, dict[str, np.ndarray]]:
    return str(tmp_path), write_cifar(tmp_path, "cifar10")


@pytest.fixture()
def folder_root(tmp_path: Path) -> str:
    write_image_tree(tmp_path, {"train": 6, "val": 3})
    return str(tmp_path)


# ---------------------------------------------------------------- digits: shapes and values


def test_digits_shapes_ranges_and_normalisation():
    data = build(DataConfig(), batch_size=64)
    assert (data.num_classes, data.in_chans, data.img_size, data.test_img_size) == (10, 1, 8, 8)
    assert (data.n_train + data.n_val, data.n_test) == (1437, 360)
    assert data.n_val == round(0.1 * 1437)
    assert data.steps_per_epoch == data.n_train // 64
    assert (data.crop, data.crop_padding, data.hflip) == ("pad", 1, 0.0)
    batches = list(data.train_batches(0))
    assert len(batches) == data.steps_per_epoch
    for x, y in batches:
        assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32
        assert y.shape == (64,) and y.dtype == torch.int64
        assert 0 <= y.min() and y.max() < 10
    x, y = all_eval(data)
    assert x.shape == (360, 1, 8, 8) and y.shape == (360,)
    # Normalised with the dataset's statistics: about zero mean and unit spread.
    assert abs(x.mean().item()) < 0.1 and 0.9 < x.std().item() < 1.1
    pixels = to_pixels(data, x).float()
    assert torch.allclose(pixels, (x * data.std[0] + data.mean[0]) * 255, atol=0.01)
    assert pixels.max() == 255 and pixels.min() == 0
    assert set(y.tolist()) == set(range(10))


def test_digits_test_split_is_the_same_for_every_seed():
    a, b = build(DataConfig(), seed=0), build(DataConfig(), seed=7)
    xa, ya = all_eval(a)
    xb, yb = all_eval(b)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_img_size_and_test_img_size_resize():
    data = build(DataConfig(img_size=16, test_img_size=12, crop="rrc"), batch_size=16)
    x, _ = next(data.train_batches(0))
    assert x.shape == (16, 1, 16, 16)
    assert next(data.eval_batches())[0].shape[-2:] == (12, 12)
    assert next(data.calibration_batches(num_images=5)).shape == (5, 1, 12, 12)


# ---------------------------------------------------------------- determinism and sharding

AUGMENTED = dict(
    crop="rrc",
    hflip=0.5,
    auto_augment="rand-m9-mstd0.5-inc1",
    reprob=0.5,
    mixup=0.8,
    cutmix=1.0,
    train_subset=256,
)


def test_same_seed_same_batches_and_epochs_differ():
    first = list(build(DataConfig(**AUGMENTED), seed=3).train_batches(2))
    second = list(build(DataConfig(**AUGMENTED), seed=3).train_batches(2))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    plain = build(DataConfig(**PLAIN), seed=3)
    _, y0 = all_train(plain, 0)
    _, y0_again = all_train(plain, 0)
    _, y1 = all_train(plain, 1)
    assert torch.equal(y0, y0_again) and not torch.equal(y0, y1)
    other_seed = build(DataConfig(**PLAIN), seed=4)
    assert not torch.equal(y0, all_train(other_seed, 0)[1])


def test_global_rng_streams_are_left_alone():
    data = build(DataConfig(**AUGMENTED, color_jitter=0.4))
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    for _ in data.train_batches(0):
        pass
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_ranks_take_disjoint_shares_of_the_global_batch():
    cfg = DataConfig(**PLAIN)
    whole = list(build(cfg, batch_size=64).train_batches(5))
    shards = [
        list(build(cfg, batch_size=64, rank=r, world_size=2).train_batches(5)) for r in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == len(whole)
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *shards):
        assert x0.shape[0] == x1.shape[0] == 32
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


@pytest.mark.parametrize("world_size", [2, 3])
def test_eval_shards_cover_every_image_once(world_size):
    cfg = DataConfig()
    x, y = all_eval(build(cfg, batch_size=30), batch_size=50)
    parts = [
        all_eval(build(cfg, batch_size=30, rank=r, world_size=world_size), batch_size=50)
        for r in range(world_size)
    ]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert torch.equal(torch.cat([p[1] for p in parts]), y)


# ---------------------------------------------------------------- splits, subset, calibration


def test_val_split_is_disjoint_from_train_and_seeded(cifar10_root):
    root, written = cifar10_root
    data = build(DataConfig(name="cifar10", root=root, val_size=0.2, **PLAIN), batch_size=4)
    assert (data.n_train, data.n_val) == (40, 10)
    train = as_rows(to_pixels(data, torch.cat(list(data.calibration_batches(num_images=10**6)))))
    val = as_rows(to_pixels(data, all_eval(data, "val")[0]))
    assert len(train) == 40 and len(val) == 10 and not train & val
    assert train | val == as_rows(torch.from_numpy(written["train_x"]))
    # The split depends on the seed, and on nothing else: not on the train subset.
    subset = build(
        DataConfig(name="cifar10", root=root, val_size=0.2, train_subset=15), batch_size=4
    )
    assert torch.equal(all_eval(subset, "val")[0], all_eval(data, "val")[0])
    subset_train = as_rows(to_pixels(subset, torch.cat(list(subset.calibration_batches(10**6)))))
    assert len(subset_train) == 15 and subset_train <= train
    reseeded = build(DataConfig(name="cifar10", root=root, val_size=0.2), batch_size=4, seed=1)
    assert as_rows(to_pixels(reseeded, all_eval(reseeded, "val")[0])) != val


def test_train_subset_size_and_no_val_split():
    data = build(DataConfig(train_subset=100, val_size=0.0, **PLAIN), batch_size=32)
    assert (data.n_train, data.n_val, data.steps_per_epoch) == (100, 0, 3)
    x, _ = all_train(data)
    assert x.shape[0] == 96 and len(as_rows(x)) > 90  # drop_last; (nearly) all distinct
    with pytest.raises(ValueError, match="val_size"):
        next(data.eval_batches("val"))


def test_calibration_batches_are_the_same_every_call():
    data = build(DataConfig(calib_images=300), batch_size=32)
    first = list(data.calibration_batches(batch_size=128))
    assert [len(b) for b in first] == [128, 128, 44]
    second = list(data.calibration_batches(batch_size=100))
    assert torch.equal(torch.cat(first), torch.cat(second))
    assert sum(len(b) for b in data.calibration_batches(num_images=10**6)) == data.n_train
    assert len(as_rows(torch.cat(first))) > 290  # distinct training images, not repeats


# ---------------------------------------------------------------- augmentation


def pad_crop_flip_candidates(image: torch.Tensor, padding: int) -> dict[tuple, torch.Tensor]:
    """Every result a padded crop and flip can give, by plain slicing."""
    padded = F.pad(image, (padding,) * 4)
    h, w = image.shape[-2:]
    out = {}
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            out[(dy, dx, False)] = crop
            out[(dy, dx, True)] = crop.flip(-1)
    return out


def test_pad_crop_and_flip_are_per_image_and_correct(cifar10_root):
    root, _ = cifar10_root
    augmented = build(DataConfig(name="cifar10", root=root, hflip=0.5), batch_size=40)
    plain = build(DataConfig(name="cifar10", root=root, **PLAIN), batch_size=40)
    x_aug, y_aug = next(augmented.train_batches(0))
    x_plain, y_plain = next(plain.train_batches(0))
    assert torch.equal(y_aug, y_plain)  # same order: it depends on (seed, epoch) only
    aug, clean = to_pixels(augmented, x_aug), to_pixels(plain, x_plain)
    found = []
    for a, c in zip(aug, clean):
        matches = [k for k, v in pad_crop_flip_candidates(c, 4).items() if torch.equal(v, a)]
        assert matches, "an augmented image is no padded crop or flip of its source"
        found.append(matches[0])
    assert len(set(found)) > 10  # each image has its own crop offset and flip
    assert {flip for _, _, flip in found} == {False, True}


def test_random_resized_crop_boxes_are_exact_pixel_blocks():
    images = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    whole = random_resized_crop_flip(images, 12, 0.0, generator, scale=(1, 1), ratio=(1, 1))
    assert torch.equal(whole, images)
    flipped = random_resized_crop_flip(images, 12, 1.0, generator, scale=(1, 1), ratio=(1, 1))
    assert torch.equal(flipped, images.flip(-1))
    # A quarter of the area at a 1:1 ratio is a 6x6 block, sampled one to one.
    blocks = random_resized_crop_flip(images, 6, 0.0, generator, scale=(0.25, 0.25), ratio=(1, 1))
    offsets = []
    for block, image in zip(blocks, images):
        found = [
            (top, left)
            for top in range(7)
            for left in range(7)
            if torch.equal(image[:, top : top + 6, left : left + 6], block)
        ]
        assert found, "a crop is not a block of its image"
        offsets.append(found[0])
    assert len(set(offsets)) > 4


@pytest.mark.parametrize(
    "options",
    [
        dict(crop="rrc", hflip=0.0),
        dict(crop="none", hflip=0.0, auto_augment="rand-m9-mstd0.5-inc1"),
        dict(crop="none", hflip=0.0, auto_augment="original"),
        dict(crop="none", hflip=0.0, auto_augment="trivialaugment"),
        dict(crop="none", hflip=0.0, color_jitter=0.4),
        dict(crop="none", hflip=0.0, reprob=1.0),
    ],
)
def test_augmentations_change_images_per_image(tmp_path, options):
    # All training images are one image: per-image random parameters make them differ.
    written = write_cifar(tmp_path, "cifar10", identical=True)
    data = build(DataConfig(name="cifar10", root=str(tmp_path), **options), batch_size=40)
    x, _ = next(data.train_batches(0))
    assert x.shape == (40, 3, 32, 32) and x.dtype == torch.float32
    source = torch.from_numpy(written["train_x"][:1]).float()
    plain = (source / 255 - torch.tensor(data.mean).view(1, 3, 1, 1)) / torch.tensor(data.std).view(
        1, 3, 1, 1
    )
    changed = (x - plain).abs().flatten(1).amax(1) > 1e-3
    assert changed.sum() >= 20  # most images changed ...
    assert len(as_rows(x)) >= 10  # ... each in its own way


def test_mixup_gives_soft_targets_that_sum_to_one():
    data = build(DataConfig(mixup=0.8, cutmix=1.0, label_smoothing=0.1), batch_size=32)
    assert data.mixup_active
    for x, y in data.train_batches(0):
        assert x.shape == (32, 1, 8, 8)
        assert y.shape == (32, 10) and y.dtype == torch.float32
        assert torch.allclose(y.sum(1), torch.ones(32))
    assert (y.max(1).values < 0.95).any()  # mixed, not one-hot
    assert not build(DataConfig(), batch_size=32).mixup_active


# ---------------------------------------------------------------- every dataset


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_from_files_in_the_real_format(tmp_path, name):
    written = write_cifar(tmp_path, name)
    data = build(DataConfig(name=name, root=str(tmp_path), val_size=0.0), batch_size=8)
    classes = 10 if name == "cifar10" else 100
    assert (data.num_classes, data.in_chans, data.img_size) == (classes, 3, 32)
    assert data.classes[:2] == ["class0", "class1"]
    assert (data.n_train, data.n_test) == (len(written["train_y"]), len(written["test_y"]))
    x, y = all_eval(data)
    assert torch.equal(y, torch.from_numpy(written["test_y"]))
    assert torch.equal(to_pixels(data, x), torch.from_numpy(written["test_x"]))
    xb, yb = next(data.train_batches(0))
    assert xb.shape == (8, 3, 32, 32) and yb.dtype == torch.int64


def test_fashion_mnist_reader_on_idx_files(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(2)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (40, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 40),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 12),
    }
    for stem, array in arrays.items():
        write_idx(raw / (stem + ".gz"), array)
    data = build(DataConfig(name="fashion-mnist", root=str(tmp_path), val_size=0.0), batch_size=8)
    assert (data.n_train, data.n_test, data.in_chans, data.img_size) == (40, 12, 1, 28)
    x, y = all_eval(data)
    assert torch.equal(y, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]))
    assert torch.equal(
        to_pixels(data, x)[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).to(torch.uint8)
    )


@pytest.mark.skipif(
    not (FASHION_MNIST_SYSTEM_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed",
)
def test_fashion_mnist_from_the_debian_package(tmp_path):
    data = build(
        DataConfig(name="fashion-mnist", root=str(tmp_path), train_subset=500), batch_size=100
    )
    assert (data.n_train, data.n_val, data.n_test) == (500, 6000, 10000)
    assert data.classes[0] == "T-shirt/top" and data.num_classes == 10
    x, y = next(data.train_batches(0))
    assert x.shape == (100, 1, 28, 28) and y.max() < 10
    x, y = all_eval(data)
    assert x.shape == (10000, 1, 28, 28) and torch.bincount(y).tolist() == [1000] * 10


def test_imagefolder_from_a_png_tree(folder_root):
    cfg = DataConfig(
        name="imagefolder", root=folder_root, img_size=32, val_size=0.25, num_workers=0
    )
    data = build(cfg, batch_size=4)
    assert (data.num_classes, data.classes, data.in_chans) == (2, ["cat", "dog"], 3)
    assert (data.n_train, data.n_val, data.n_test, data.steps_per_epoch) == (9, 3, 6, 2)
    assert (data.crop, data.hflip, data.test_img_size) == ("rrc", 0.5, 32)
    batches = list(data.train_batches(0))
    assert len(batches) == 2 and batches[0][0].shape == (4, 3, 32, 32)
    assert batches[0][1].dtype == torch.int64
    x, y = all_eval(data, batch_size=4)
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [0, 0, 0, 1, 1, 1]
    assert all_eval(data, "val")[0].shape == (3, 3, 32, 32)
    assert torch.equal(
        torch.cat(list(data.calibration_batches(5))), torch.cat(list(data.calibration_batches(5)))
    )
    # Same seed, same batches; the augmentation seeds travel with the samples, so they do not
    # depend on the number of workers either.
    again = list(build(cfg, batch_size=4).train_batches(0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    workers = build(replace(cfg, num_workers=1), batch_size=4)
    # (consumed whole, so the worker is idle when the loader is collected)
    with_workers = list(workers.train_batches(0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, with_workers))
    assert not torch.equal(batches[0][0], next(data.train_batches(1))[0])


def test_imagefolder_sharding_and_mixup(folder_root):
    cfg = DataConfig(name="imagefolder", root=folder_root, img_size=16, val_size=0.0, num_workers=0)
    plain = replace(cfg, crop="none", hflip=0.0)
    whole = list(build(plain, batch_size=4).train_batches(0))
    halves = [
        list(build(plain, batch_size=4, rank=r, world_size=2).train_batches(0)) for r in (0, 1)
    ]
    for (x, _), (x0, _), (x1, _) in zip(whole, *halves):
        assert torch.equal(torch.cat([x0, x1]), x)
    mixed = build(replace(cfg, mixup=0.8), batch_size=4)
    _, y = next(mixed.train_batches(0))
    assert y.shape == (4, 2) and torch.allclose(y.sum(1), torch.ones(4))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "cfg, kwargs, match",
    [
        (DataConfig(name="mnist"), {}, "unknown dataset 'mnist'"),
        (DataConfig(train_subset=-5), {}, "train_subset=-5"),
        (DataConfig(val_size=1.0), {}, "val_size=1.0"),
        (DataConfig(val_size=-0.1), {}, "val_size=-0.1"),
        (DataConfig(train_subset=5000), {}, "train_subset=5000"),
        (DataConfig(crop="center"), {}, "crop='center'"),
        (DataConfig(auto_augment="randaug-9"), {}, "auto_augment='randaug-9'"),
        (DataConfig(), dict(batch_size=33, world_size=2), "batch_size=33"),
        (DataConfig(), dict(batch_size=4096), "batch_size=4096"),
        (DataConfig(), dict(rank=2, world_size=2), "rank=2"),
        (DataConfig(mixup=0.2), dict(batch_size=6, world_size=2), "per-rank batch 3"),
        (DataConfig(name="imagefolder", on_device=True), {}, "on_device"),
    ],
)
def test_bad_settings_raise_value_error(cfg, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(cfg, **{"batch_size": 32, **kwargs})


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        build(DataConfig(name="imagenet"))
    assert all(name in str(err.value) for name in DATASETS)


@pytest.mark.parametrize(
    "name, hint", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")]
)
def test_missing_cifar_says_how_to_get_it(tmp_path, name, hint):
    with pytest.raises(FileNotFoundError) as err:
        build(DataConfig(name=name, root=str(tmp_path)))
    message = str(err.value)
    assert "data.download=true" in message and hint in message and "\n" not in message


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "not-installed")
    with pytest.raises(FileNotFoundError) as err:
        build(DataConfig(name="fashion-mnist", root=str(tmp_path)))
    message = str(err.value)
    assert "dataset-fashion-mnist" in message and "data.download=true" in message
    assert "\n" not in message


def test_missing_imagefolder_and_mismatched_classes(tmp_path):
    with pytest.raises(FileNotFoundError, match="train"):
        build(DataConfig(name="imagefolder", root=str(tmp_path)))
    write_image_tree(tmp_path, {"train": 2, "val": 1})
    (tmp_path / "val" / "dog" / "0.png").rename(tmp_path / "val" / "cat" / "9.png")
    (tmp_path / "val" / "dog").rmdir()
    with pytest.raises(ValueError, match="class folders differ"):
        build(DataConfig(name="imagefolder", root=str(tmp_path)), batch_size=2)


def test_bad_eval_split_raises():
    data = build(DataConfig())
    with pytest.raises(ValueError, match="'train'"):
        next(data.eval_batches("train"))


def test_every_dataset_has_a_spec():
    assert set(SPECS) == set(DATASETS)


@pytest.mark.parametrize(
    "cfg",
    [
        DataConfig(**AUGMENTED),  # rrc, RandAugment, erasing, mixup/cutmix
        DataConfig(crop="pad", hflip=0.5, color_jitter=0.4, train_subset=256),
    ],
    ids=["rrc-randaugment-mixup", "pad-jitter"],
)
def test_train_batches_from_a_step_equal_the_rest_of_the_epoch(cfg):
    _assert_rest_of_epoch(build(cfg, seed=1), epoch=3, start=5)


def _assert_rest_of_epoch(data, epoch: int, start: int) -> list:
    """Batches from step ``start`` equal the rest of an uninterrupted epoch; returns those."""
    whole = list(data.train_batches(epoch))
    rest = list(data.train_batches(epoch, start=start))
    assert len(rest) == len(whole) - start
    for (x, y), (x_rest, y_rest) in zip(whole[start:], rest):
        assert torch.equal(x, x_rest) and torch.equal(y, y_rest)
    return whole


def test_imagefolder_batches_from_a_step_with_workers(folder_root):
    cfg = DataConfig(name="imagefolder", root=folder_root, img_size=16, val_size=0.0, num_workers=2)
    cfg.color_jitter, cfg.mixup = 0.4, 0.5
    data = build(cfg, batch_size=4)
    whole = _assert_rest_of_epoch(data, epoch=1, start=2)
    # the next epoch starts from step 0 again
    assert len(list(data.train_batches(2))) == len(whole)


def test_default_workers_share_the_cpus_among_the_ranks_of_a_node(monkeypatch):
    from nestedtrain.data.workers import default_workers

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_workers() == 16  # at most 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_workers() == 7  # 8 CPUs a rank, one for the rank itself
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert default_workers() == 1  # at least 1
    assert DataConfig().num_workers is None


_HOLD_WORKERS = """
import multiprocessing, sys, time, torch
from nestedtrain.data import DataConfig, build_data
cfg = DataConfig(name="imagefolder", root=sys.argv[1], img_size=8, val_size=0, num_workers=2)
data = build_data(cfg, batch_size=4, seed=0, device=torch.device("cpu"))
next(data.train_batches(epoch=0))
print(*(p.pid for p in multiprocessing.active_children()), flush=True)
time.sleep(300)
"""


def test_folder_workers_leave_when_their_process_is_killed(tmp_path):
    """SIGKILL leaves the main process no say: its workers (which ignore SIGTERM) notice
    that their parent is gone (torch's worker watchdog, every 5 s) and leave."""
    write_image_tree(tmp_path / "images", {"train": 8, "val": 2}, size=12)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_WORKERS, str(tmp_path / "images")],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        workers = [int(pid) for pid in proc.stdout.readline().split()]
    finally:
        proc.kill()
        proc.wait()
    assert len(workers) == 2, workers
    killed = time.monotonic()
    while any(_alive(pid) for pid in workers) and time.monotonic() < killed + 15:
        time.sleep(0.2)
    left = [pid for pid in workers if _alive(pid)]
    assert not left, f"workers {left} alive {time.monotonic() - killed:.1f} s after the kill"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by init) is gone too
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split(")")[-1].split()[0] == "Z")
