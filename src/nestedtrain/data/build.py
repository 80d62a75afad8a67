"""``build_data``: a recipe's data section checked, loaded and split, as a :class:`Data`.

Small datasets take the tensor path (``tensor.py``), ``imagefolder`` the folder path
(``folder.py``); both are a ``Data`` (``base.py``).
"""

from __future__ import annotations

import torch

from .base import Data
from .checks import check_config, check_for_dataset
from .config import DataConfig
from .datasets import SPECS
from .folder import folder_data
from .tensor import tensor_data
from .transforms import build_pil_augment

__all__ = ["build_data"]


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
    check_config(cfg, batch_size, rank, world_size)
    device = torch.device(device)
    spec = SPECS[cfg.name]
    check_for_dataset(cfg, spec)
    img_size = cfg.img_size or spec.native_size
    pil_augment = build_pil_augment(cfg.auto_augment, cfg.color_jitter, img_size, spec.mean)
    common = dict(batch_size=batch_size, seed=seed, device=device, rank=rank, world_size=world_size)
    if cfg.name == "imagefolder":
        return folder_data(cfg, spec, pil_augment, common)
    return tensor_data(cfg, spec, pil_augment, common)
