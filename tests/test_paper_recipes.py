"""The papers' recipes as the papers ran them: the whole training split, and the ST++ reference
code's augmentations (PCA lighting in A1, UniformAugment in A2) as data options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from test_data import CPU, PLAIN, all_train, build, write_cifar, write_image_tree
from timm.data.auto_augment import RandAugment
from torchvision import transforms as T

from nestedtrain.data import DataConfig
from nestedtrain.data.seeding import host_rng_scope
from nestedtrain.data.transforms import (
    build_pil_augment,
    folder_eval_transform,
    folder_train_transform,
    pca_lighting_offset,
    uniform_augment,
)
from nestedtrain.engine.config import load_config
from nestedtrain.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
# Recipes that reproduce a paper's table: trained on the whole train split, as the papers did.
PAPER_RECIPES = sorted(
    p.name
    for p in (REPO / "recipes").glob("*.yaml")
    if not p.name.startswith(("digits_", "fmnist_", "motivation_digits", "motivation_fmnist"))
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipes_train_on_the_whole_training_split(name):
    cfg = load_config(REPO / "recipes" / name)
    assert cfg.data.val_size == 0 and cfg.data.num_folds == 0 and cfg.data.train_subset is None


def test_stpp_imagenet_recipes_have_the_reference_codes_augmentations():
    a1 = load_config(REPO / "recipes" / "stpp_imagenet_resnet50_a1.yaml").data
    a2 = load_config(REPO / "recipes" / "stpp_imagenet_resnet50_a2.yaml").data
    assert (a1.color_jitter, a1.pca_lighting, a1.auto_augment) == (0.4, 0.1, None)
    assert (a2.color_jitter, a2.pca_lighting, a2.auto_augment) == (0.4, 0.1, "uniformaugment")


def test_uniform_augment_is_two_uniform_draws_of_its_fourteen_operations():
    policy = uniform_augment(IMAGENET_MEAN)
    assert isinstance(policy, RandAugment) and policy.num_layers == 2
    names = {op.name for op in policy.ops}
    assert len(policy.ops) == 14 and "SolarizeAdd" not in names and "PosterizeOriginal" in names
    assert all(op.prob == 0.5 and op.magnitude_std == float("inf") for op in policy.ops)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8))
    outputs = []
    for seed in range(12):
        with host_rng_scope(seed):
            outputs.append(np.asarray(policy(image)).tobytes())
    with host_rng_scope(3):
        assert np.asarray(policy(image)).tobytes() == outputs[3]  # seeded: reproducible
    assert len(set(outputs)) > 6  # and it does change images, differently per draw
    # A2 = UniformAugment, then A1's colour jitter (timm would drop the jitter)
    both = build_pil_augment("uniformaugment", 0.4, 32, IMAGENET_MEAN)
    assert isinstance(both, T.Compose)
    assert [type(t) for t in both.transforms] == [RandAugment, T.ColorJitter]
    assert build_pil_augment("uniformaugment", 0.0, 32, IMAGENET_MEAN).transforms[0].ops


def test_pca_lighting_offsets_have_imagenets_colour_covariance():
    # Offsets are eigvec @ (alpha * eigval), alpha ~ N(0, 0.1²): their covariance is
    # eigvec diag((0.1 eigval)²) eigvec^T.
    alpha = torch.randn(200_000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    offsets = pca_lighting_offset(0.1 * alpha)
    eigval = torch.tensor([0.2175, 0.0188, 0.0045], dtype=torch.float64)
    eigvec = torch.tensor(
        [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]],
        dtype=torch.float64,
    )
    expected = eigvec @ torch.diag((0.1 * eigval) ** 2) @ eigvec.T
    assert torch.allclose(offsets.T.cov(), expected, rtol=0.02, atol=1e-7)


def test_folder_workers_send_uint8_images_and_the_float_work_is_left_to_the_device():
    image = Image.fromarray(np.zeros((40, 30, 3), np.uint8))
    for transform in (
        folder_train_transform(16, "rrc", 0, 0.5, build_pil_augment(None, 0.4, 16, IMAGENET_MEAN)),
        folder_eval_transform(16, 0.875),
    ):
        kinds = [type(t).__name__ for t in transform.transforms]
        assert kinds[-1] == "PILToTensor" and "Normalize" not in kinds
        out = transform(image)
        assert out.dtype == torch.uint8 and out.shape == (3, 16, 16)


def test_on_device_lighting_shifts_each_image_and_channel_by_a_seeded_constant(tmp_path):
    write_cifar(tmp_path, "cifar10", per_file=8)
    cfg = DataConfig(name="cifar10", root=str(tmp_path), val_size=0, **PLAIN)
    plain, _ = all_train(build(cfg, batch_size=8))
    lit, _ = all_train(build(OmegaConf.merge(cfg, {"pca_lighting": 0.1}), batch_size=8))
    again, _ = all_train(build(OmegaConf.merge(cfg, {"pca_lighting": 0.1}), batch_size=8))
    assert torch.equal(lit, again)
    shift = lit - plain
    per_channel = shift[:, :, :1, :1]
    assert torch.allclose(shift, per_channel.expand_as(shift), atol=1e-5)
    assert (per_channel.flatten(1).abs().amax(1) > 0).all()  # every image gets its own draw
    assert len({tuple(p.flatten().tolist()) for p in per_channel}) == len(per_channel)


def test_lighting_refuses_grayscale_data_and_negative_strengths(tmp_path):
    with pytest.raises(ConfigError, match="pca_lighting=0.1: digits has 1 channel"):
        build(DataConfig(name="digits", pca_lighting=0.1))
    with pytest.raises(ConfigError, match=r"data.pca_lighting=-1.0: must be >= 0"):
        build(DataConfig(name="digits", pca_lighting=-1.0))


def test_an_image_folder_trains_with_both_augmentations(tmp_path):
    write_image_tree(tmp_path / "imgs", {"train": 6, "val": 2}, size=24)
    cfg = DataConfig(
        name="imagefolder",
        root=str(tmp_path / "imgs"),
        img_size=16,
        val_size=0,
        num_workers=0,
        color_jitter=0.4,
        pca_lighting=0.1,
        auto_augment="uniformaugment",
    )
    images, labels = all_train(build(cfg, batch_size=4))
    assert images.shape == (12, 3, 16, 16) and images.dtype == torch.float32
    again, _ = all_train(build(cfg, batch_size=4))
    assert torch.equal(images, again)
    assert CPU == images.device
