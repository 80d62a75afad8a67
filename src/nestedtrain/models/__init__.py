"""Models: our CIFAR ResNets first, every other name through ``timm.create_model``."""

from __future__ import annotations

import timm
from torch import nn

from ..errors import ConfigError
from .cifar_resnet import CIFAR_DEPTHS, BasicBlock, CifarResNet

__all__ = ["BasicBlock", "CifarResNet", "CIFAR_DEPTHS", "create_model", "is_known_model"]


def is_known_model(name: str) -> bool:
    """Whether ``name`` is one of ours or a timm model name, with or without a pretrained tag
    (``resnet50.a1_in1k``)."""
    return name in CIFAR_DEPTHS or bool(timm.list_models(name)) or timm.is_model(name)


def create_model(
    name: str, num_classes: int = 1000, in_chans: int = 3, pretrained: bool = False, **kwargs
) -> nn.Module:
    """Build ``name``: one of our CIFAR ResNets, else any timm model.

    Raises:
        ConfigError: when neither nestedtrain nor timm knows ``name``.
    """
    if not is_known_model(name):
        raise ConfigError(
            f"unknown model {name!r}: use one of {sorted(CIFAR_DEPTHS)} or a timm model name "
            "(see timm.list_models())"
        )
    return timm.create_model(
        name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs
    )
