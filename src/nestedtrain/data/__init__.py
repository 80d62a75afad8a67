"""Data: datasets, splits and augmentation, as batches on the device.

``build_data(DataConfig(...), batch_size=..., seed=..., device=...)`` returns a ``Data`` whose
``train_batches(epoch)``, ``eval_batches(split)`` and ``calibration_batches()`` yield tensors
on the device, sharded over data-parallel ranks.
"""

from __future__ import annotations

from .base import Data
from .build import build_data
from .config import DataConfig
from .datasets import DATASETS
from .images import BadImageError

__all__ = ["DATASETS", "BadImageError", "Data", "DataConfig", "build_data"]
