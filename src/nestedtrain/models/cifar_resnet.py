"""CIFAR ResNets of He et al. 2016 (resnet20/32/44/56/110).

Three stages of n BasicBlocks with 16/32/64 channels on 32x32 inputs, depth = 6n + 2, and the
parameter-free identity shortcut ("option A": stride-2 subsampling and zero-padded channels)
where a block changes shape. timm has no such models, so they are written here and registered
in timm's model registry under their usual names.

``drop_path_rate`` adds stochastic depth (Huang et al. 2016) with timm's ``DropPath`` on each
residual branch, its rate rising linearly with depth as in timm's ResNets.

Like timm's ResNets, each block's last BN starts at zero (``zero_init_last=True``), so deep
models start as a stack of identities. On the bundled digits (recipes/digits_ct.yaml), resnet32
reached 98.89% with it and 96.39% from He et al.'s plain initialisation (README, "What the
demo shows").

The layout follows timm's ResNet (``conv1``/``bn1`` stem, ``layer1..3``, ``fc`` head, blocks
with a ``downsample`` attribute that is ``None`` for identity shortcuts), so the same stage
discovery works for both, and an ordered sub-network of a deeper model has exactly the
``state_dict`` of a shallower one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import register_model
from torch import nn

from ..errors import ConfigError

__all__ = ["BasicBlock", "CifarResNet", "CIFAR_DEPTHS"]

# Blocks per stage for each registered depth (depth = 6n + 2).
CIFAR_DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially and zero-pad the new channels. No parameters."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extra = planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        changes_shape = stride != 1 or in_planes != planes
        self.downsample = PadShortcut(in_planes, planes, stride) if changes_shape else None
        # Stochastic depth (timm's DropPath, per image): at rate 0 an Identity, which draws no
        # random numbers, so models without it train as before.
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(self.drop_path(out) + shortcut)


class CifarResNet(nn.Module):
    """ResNet for 32x32 images with the timm model contract (forward_features/forward_head)."""

    def __init__(
        self,
        blocks_per_stage: int | tuple[int, int, int],
        num_classes: int = 10,
        in_chans: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        zero_init_last: bool = True,
    ):
        super().__init__()
        if isinstance(blocks_per_stage, int):
            blocks_per_stage = (blocks_per_stage,) * len(widths)
        self.num_classes = num_classes
        self.num_features = widths[-1]
        self.drop_rate = drop_rate
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        if not 0.0 <= drop_path_rate < 1.0:
            raise ConfigError(f"drop_path_rate={drop_path_rate} must be in [0, 1)")
        in_planes = widths[0]
        self.feature_info = []
        # Stochastic depth's linear rule (Huang et al. 2016, as timm's ResNets): block j of
        # the N blocks drops its residual branch with probability drop_path_rate * j / (N - 1).
        total = sum(blocks_per_stage)
        index = 0
        for i, (width, n) in enumerate(zip(widths, blocks_per_stage)):
            stride = 1 if i == 0 else 2
            layers = []
            for b in range(n):
                rate = drop_path_rate * index / max(total - 1, 1)
                layers.append(BasicBlock(in_planes, width, stride if b == 0 else 1, rate))
                in_planes, index = width, index + 1
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
            self.feature_info.append(
                {"num_chs": width, "reduction": 2**i, "module": f"layer{i + 1}"}
            )
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            # timm's zero_init_last: each residual branch starts at zero, so every block starts
            # as the identity and deep models start with small logits.
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    @property
    def stage_names(self) -> list[str]:
        return [info["module"] for info in self.feature_info]

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cifar_cfg(name: str) -> dict:
    return {
        "architecture": name,
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
        "first_conv": "conv1",
        "classifier": "fc",
    }


def _create(name: str, pretrained: bool, **kwargs) -> CifarResNet:
    if pretrained:
        raise ConfigError(
            f"no pretrained weights exist for {name!r}; train it, or start from a checkpoint "
            "with model.init_from=PATH"
        )
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)  # timm.create_model passes these to every model function
    model = CifarResNet(CIFAR_DEPTHS[name], **kwargs)
    model.pretrained_cfg = model.default_cfg = _cifar_cfg(name)
    return model


def _entrypoint(name: str) -> Callable[..., CifarResNet]:
    """timm's model function for ``name``: ``name(pretrained=False, **kwargs)``."""
    blocks = CIFAR_DEPTHS[name]

    def create(pretrained: bool = False, **kwargs) -> CifarResNet:
        return _create(name, pretrained, **kwargs)

    create.__name__ = create.__qualname__ = name  # timm registers a function under its __name__
    create.__doc__ = f"ResNet-{6 * blocks + 2} for CIFAR ({blocks} blocks per stage)."
    return create


# resnet20 ... resnet110, one per depth, bound here as written-out functions would be
# (register_model adds each name to __all__).
for _name in CIFAR_DEPTHS:
    globals()[_name] = register_model(_entrypoint(_name))
del _name
