"""The training engine: recipe, building its objects, trainer, evaluation, checkpoints,
distributed setup."""

from .build import METHODS, build_method, build_model
from .checkpoint import atomic_save, load_checkpoint, load_model
from .config import TrainConfig, load_config
from .evaluate import evaluate, evaluate_subnets, select_subnets
from .trainer import Trainer, train

__all__ = [
    "METHODS",
    "TrainConfig",
    "Trainer",
    "atomic_save",
    "build_method",
    "build_model",
    "evaluate",
    "evaluate_subnets",
    "load_checkpoint",
    "load_config",
    "load_model",
    "select_subnets",
    "train",
]
