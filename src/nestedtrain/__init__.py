"""nestedtrain: train residual networks through their nested sub-networks.

Importing nestedtrain registers its CIFAR ResNets (resnet20/32/44/56/110) in timm's model
registry; that is its only side effect.
"""

from __future__ import annotations

from . import bn
from .elastic import (
    OrderedSampler,
    Stage,
    StageSpec,
    StochasticSampler,
    Subnet,
    declare_stages,
    export_subnet,
    find_stages,
    use_subnet,
)
from .losses import kl_loss
from .models import create_model

__version__ = "0.1.0"

__all__ = [
    "OrderedSampler",
    "Stage",
    "StageSpec",
    "StochasticSampler",
    "Subnet",
    "__version__",
    "bn",
    "create_model",
    "declare_stages",
    "export_subnet",
    "find_stages",
    "kl_loss",
    "use_subnet",
]
