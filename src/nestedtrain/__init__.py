"""nestedtrain: train residual networks through their nested sub-networks.

Its names load on first use (PEP 562), so that ``import nestedtrain`` is cheap and the command
line can handle stop signals before torch loads. Loading ``nestedtrain.models`` (which
``create_model``, ``Trainer`` and the rest do) registers the CIFAR ResNets
(resnet20/32/44/56/110) in timm's model registry; that is the package's only side effect.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

# public name -> the submodule it comes from (None: the name is a submodule)
_PUBLIC = {
    "CommonTraining": "methods",
    "MotivationTraining": "methods",
    "OrderedSampler": "elastic",
    "Precision": "methods",
    "SandwichTraining": "methods",
    "Stage": "elastic",
    "StageSpec": "elastic",
    "StimulativeTraining": "methods",
    "StochasticSampler": "elastic",
    "Subnet": "elastic",
    "Trainer": "engine",
    "bn": None,
    "create_model": "models",
    "declare_stages": "elastic",
    "export_subnet": "elastic",
    "find_stages": "elastic",
    "kl_loss": "losses",
    "load_config": "engine",
    "load_model": "engine",
    "train": "engine",
    "use_subnet": "elastic",
}

__all__ = [  # _PUBLIC's names, spelled out for tools that read __all__ without running it
    "CommonTraining",
    "MotivationTraining",
    "OrderedSampler",
    "Precision",
    "SandwichTraining",
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

if TYPE_CHECKING:  # what type checkers and editors see; at run time __getattr__ loads these
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
    from .engine import Trainer, load_config, load_model, train
    from .losses import kl_loss
    from .methods import (
        CommonTraining,
        MotivationTraining,
        Precision,
        SandwichTraining,
        StimulativeTraining,
    )
    from .models import create_model


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        source = _PUBLIC[name]
        if source is None:
            value = importlib.import_module(f".{name}", __name__)
        else:
            value = getattr(importlib.import_module(f".{source}", __name__), name)
    else:
        try:  # a submodule not imported yet, e.g. nestedtrain.flops
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
