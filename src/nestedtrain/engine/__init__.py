"""The training engine: recipe, trainer, evaluation, checkpoints, distributed setup."""

from .checkpoint import atomic_save, load_checkpoint, load_model
from .config import TrainConfig, load_config
from .evaluate import evaluate, evaluate_subnets, select_subnets
from .trainer import Trainer, build_method, train

__all__ = [
    "TrainConfig",
    "Trainer",
    "atomic_save",
    "build_method",
    "evaluate",
    "evaluate_subnets",
    "load_checkpoint",
    "load_config",
    "load_model",
    "select_subnets",
    "train",
]
