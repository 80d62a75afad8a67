"""The training engine: recipe, building its objects, trainer, per-epoch evaluation,
checkpoints, distributed setup."""

from .build import build_method, build_model, load_model
from .checkpoint import load_checkpoint
from .config import METHODS, TrainConfig, load_config
from .trainer import Trainer, train

__all__ = [
    "METHODS",
    "TrainConfig",
    "Trainer",
    "build_method",
    "build_model",
    "load_checkpoint",
    "load_config",
    "load_model",
    "train",
]
