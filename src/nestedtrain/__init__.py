"""nestedtrain: train residual networks through their nested sub-networks.

Importing nestedtrain registers its CIFAR ResNets (resnet20/32/44/56/110) in timm's model
registry; that is its only side effect.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import bn  # noqa: E402
from .elastic import (  # noqa: E402
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
from .engine import Trainer, load_config, load_model, train  # noqa: E402
from .losses import kl_loss  # noqa: E402
from .methods import (  # noqa: E402
    CommonTraining,
    MotivationTraining,
    Precision,
    StimulativeTraining,
)
from .models import create_model  # noqa: E402

__all__ = [
    "CommonTraining",
    "MotivationTraining",
    "OrderedSampler",
    "Precision",
    "Stage",
    "StageSpec",
    "StimulativeTraining",
    "StochasticSampler",
    "Subnet",
    "Trainer",
    "__version__",
    "bn",
    "create_model",
    "declare_stages",
    "export_subnet",
    "find_stages",
    "kl_loss",
    "load_config",
    "load_model",
    "train",
    "use_subnet",
]
