"""Models trained elsewhere: a timm, torchvision or nestedtrain model named on the command
line, its weights from whatever file they come in, and a recipe to evaluate it with.

A run folder carries its recipe; a model trained elsewhere does not, so the analyses get one
here: the data section of a recipe (``recipes/x.yaml``), a dataset name (``digits``) or
``imagefolder:PATH``, whose input size and normalisation default to the model's pretrained
configuration in timm (the values its weights were trained with) where timm has one.
"""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..errors import ConfigError
from ..models import create_model
from .checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from .config import TrainConfig, load_config

__all__ = [
    "FOREIGN_METHOD",
    "TORCHVISION_PREFIX",
    "build_named_model",
    "foreign_config",
    "load_weights",
    "pretrained_defaults",
    "read_weights",
]

# ``--model torchvision:resnet50`` builds torchvision's model; any other name is ours or timm's.
TORCHVISION_PREFIX = "torchvision:"
# The ``method`` a foreign model's recipe records: how it was trained is not known here.
FOREIGN_METHOD = "foreign"
IMAGEFOLDER_PREFIX = "imagefolder:"
# Where the weights sit in the checkpoint files of timm's train.py (``state_dict``, and
# ``state_dict_ema`` alone in its EMA-only files), torchvision's references (``model``,
# ``model_ema``) and DDP/Lightning-style files (``module``), in the order they are tried.
_WEIGHT_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema", "module")
# Prefixes that wrappers add to every key: DDP's ``module.``, torch.compile's ``_orig_mod.``.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# --------------------------------------------------------------------------------- weights
def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict in a weights file: plain, a timm or torchvision training checkpoint
    (``state_dict``/``model``/``state_dict_ema`` keys), keys prefixed ``module.``, or a
    nestedtrain checkpoint.

    Raises:
        FileNotFoundError: no such file.
        ConfigError: not a file torch can read, or no state_dict in it.
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"--weights {str(path)!r}: no such file")
    try:
        # Tensors only, no arbitrary objects; timm's train.py also pickles its argparse
        # Namespace beside the weights, which is allowed here as a plain record.
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        state = load_checkpoint(source)  # a nestedtrain checkpoint (RNG states and all)
    except Exception as err:
        raise ConfigError(
            f"--weights {str(path)!r} is not readable by torch.load ({type(err).__name__})"
        ) from None
    return _state_dict_in(state, path)


def _state_dict_in(state: Any, path: str | Path) -> dict[str, torch.Tensor]:
    if isinstance(state, Mapping) and state.get("format") == CHECKPOINT_FORMAT:
        state = state["model"]
    elif isinstance(state, Mapping) and not _all_tensors(state):
        key = next((k for k in _WEIGHT_KEYS if isinstance(state.get(k), Mapping)), None)
        if key is None:
            raise ConfigError(
                f"--weights {str(path)!r} holds no state_dict: a plain state_dict or a "
                f"checkpoint with one of the keys {list(_WEIGHT_KEYS)}; it has "
                f"{sorted(map(str, state))[:8]}"
            )
        state = state[key]
    if not isinstance(state, Mapping) or not _all_tensors(state):
        raise ConfigError(f"--weights {str(path)!r} holds no state_dict of tensors")
    state = dict(state)
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _all_tensors(state: Mapping) -> bool:
    return bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``, every key and shape exactly.

    Raises:
        ConfigError: one line naming the first missing and the first unexpected key, or the
            first tensor whose shape differs.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ConfigError(
            f"{source} does not fit {type(model).__name__}: {len(missing)} missing keys "
            f"(first: {missing[0] if missing else '-'}) and {len(unexpected)} unexpected "
            f"(first: {unexpected[0] if unexpected else '-'}); is --model the architecture "
            "the weights were trained as?"
        )
    for key, tensor in own.items():
        if tensor.shape != state[key].shape:
            raise ConfigError(
                f"{source} does not fit {type(model).__name__}: {key} has shape "
                f"{tuple(state[key].shape)}, the model needs {tuple(tensor.shape)} (the "
                "number of classes or channels of --data differs from the weights'?)"
            )
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------- model
def build_named_model(
    name: str,
    num_classes: int,
    in_chans: int,
    pretrained: bool = False,
    kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """``torchvision:NAME`` from torchvision, else ours or timm's (:func:`create_model`), with
    the constructor's ``kwargs`` (e.g. a ViT's ``img_size``).

    Raises:
        ConfigError: an unknown name, torchvision with other than 3 channels, or pretrained
            weights that cannot be fetched.
    """
    try:
        if name.startswith(TORCHVISION_PREFIX):
            return _torchvision_model(
                name[len(TORCHVISION_PREFIX) :], num_classes, in_chans, pretrained, kwargs or {}
            )
        return create_model(
            name,
            num_classes=num_classes,
            in_chans=in_chans,
            pretrained=pretrained,
            **(kwargs or {}),
        )
    except ConfigError:
        raise
    except Exception as err:  # timm and torchvision raise many kinds for a failed fetch
        if not pretrained:
            raise
        raise ConfigError(
            f"could not fetch the pretrained weights of {name!r} ({type(err).__name__}): this "
            "machine may not reach the weights hub; download them elsewhere and pass --weights"
        ) from None


def _torchvision_model(
    name: str, num_classes: int, in_chans: int, pretrained: bool, kwargs: Mapping[str, Any]
) -> nn.Module:
    import torchvision.models

    if name not in torchvision.models.list_models(torchvision.models):
        raise ConfigError(
            f"unknown torchvision model {name!r}: use a name of "
            "torchvision.models.list_models(), e.g. torchvision:resnet50"
        )
    if in_chans != 3:
        raise ConfigError(
            f"torchvision:{name} takes 3-channel images and the data has {in_chans}: analyse it "
            "on RGB data"
        )
    if pretrained:
        # torchvision refuses pretrained weights with another num_classes, in one line
        try:
            return torchvision.models.get_model(
                name, weights="DEFAULT", num_classes=num_classes, **kwargs
            )
        except ValueError as err:
            raise ConfigError(f"torchvision:{name} pretrained: {err}") from None
    return torchvision.models.get_model(name, num_classes=num_classes, **kwargs)


def pretrained_defaults(name: str) -> dict[str, Any]:
    """timm's pretrained configuration of ``name`` as data fields (``test_img_size``,
    ``test_crop_pct``, ``mean``, ``std``); empty when timm has none (our CIFAR ResNets,
    torchvision names: the data's own defaults, ImageNet's for image folders)."""
    if name.startswith(TORCHVISION_PREFIX) or not timm.list_models(name.split(".")[0]):
        return {}
    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    except Exception:  # timm raises RuntimeError for a model without pretrained tags
        cfg = None
    if cfg is None:
        return {}
    cfg = cfg.to_dict()
    return {
        "test_img_size": int(cfg["input_size"][-1]),
        "test_crop_pct": float(cfg.get("crop_pct") or 0.875),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
    }


# ---------------------------------------------------------------------------------- recipe
def foreign_config(
    model_name: str,
    data: str,
    *,
    input_size: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    calib: str | None = None,
) -> DictConfig:
    """The recipe an analysis of a foreign model runs with.

    ``data`` is a recipe file (its data, batch, seed and evaluation settings), a dataset name
    or ``imagefolder:PATH`` (with timm's pretrained input size and normalisation for
    ``model_name`` where timm has them). ``input_size``, ``mean``, ``std`` override those,
    ``calib`` names a folder of class folders for BN re-estimation. ``model.name`` is
    ``model_name``, ``model.kwargs`` the recipe's when it names the same model (else none),
    and ``method`` is :data:`FOREIGN_METHOD`.

    Raises:
        ConfigError: an unreadable recipe or bad values.
    """
    if data.endswith((".yaml", ".yml")) or Path(data).is_file():
        cfg = load_config(data)
        if cfg.model.name != model_name:  # its model.kwargs are of another model
            cfg.model.kwargs = {}
        fields: dict[str, Any] = {}
    else:
        cfg = OmegaConf.structured(TrainConfig)
        fields = _named_data(data, model_name)
        if fields["name"] == "imagefolder":
            # Nothing trains here; the training batch only has to fit a small folder.
            cfg.batch_size = 1
    if input_size is not None:
        fields["test_img_size"] = fields["img_size"] = input_size
    fields.update({k: v for k, v in (("mean", mean), ("std", std)) if v is not None})
    if calib is not None:
        fields["calib_root"] = calib
    cfg = OmegaConf.merge(cfg, {"data": fields, "model": {"name": model_name}})
    cfg.method = FOREIGN_METHOD
    return cfg


def _named_data(data: str, model_name: str) -> dict[str, Any]:
    if not data.startswith(IMAGEFOLDER_PREFIX):
        return {"name": data}
    root = data[len(IMAGEFOLDER_PREFIX) :]
    if not root:
        raise ConfigError(
            "--data imagefolder: names no folder: write imagefolder:PATH, PATH holding train/ "
            "and val/"
        )
    return {"name": "imagefolder", "root": root, **pretrained_defaults(model_name)}
