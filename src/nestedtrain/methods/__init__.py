"""Training methods, each a step object the trainer (or your own loop) drives."""

from .base import MethodStep, Precision
from .common import CommonTraining
from .motivation import MotivationTraining
from .sandwich import SandwichTraining
from .stimulative import StimulativeTraining

__all__ = [
    "CommonTraining",
    "MethodStep",
    "MotivationTraining",
    "Precision",
    "SandwichTraining",
    "StimulativeTraining",
]
