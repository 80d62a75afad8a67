"""Stage discovery: every supported network is stem -> stages -> head.

A stage is an ordered container of blocks (``nn.Sequential`` or ``nn.ModuleList``) that the
model's forward iterates; a block is *skippable* when its shortcut is the identity and it keeps
its input's shape, so removing it leaves a working network.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Union

from torch import nn

from ..errors import ConfigError

__all__ = [
    "Stage",
    "StageSpec",
    "declare_stages",
    "find_stages",
    "model_family",
    "SUPPORTED_FAMILIES",
]

SkippableRule = Union[Callable[[nn.Module], bool], Sequence[Sequence[int]]]

# Attribute under which use_subnet parks a container's full block dict while a Subnet is active,
# so that stage discovery (and nested use_subnet) always sees the whole model.
FULL_BLOCKS_ATTR = "_nestedtrain_full_blocks"


@dataclass(frozen=True)
class Stage:
    """One stage of a model: its module path, container, blocks and which blocks are skippable."""

    name: str
    container: nn.Module
    blocks: tuple[nn.Module, ...]
    keys: tuple[str, ...]
    skippable: tuple[bool, ...]

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def num_trailing_skippable(self) -> int:
        """How many blocks at the end of the stage may be dropped.

        Counted over blocks 1.. only, because a stage always keeps at least one block.
        """
        count = 0
        for ok in reversed(self.skippable[1:]):
            if not ok:
                break
            count += 1
        return count


@dataclass(frozen=True)
class StageSpec:
    """A user's declaration of where the stages of an architecture are.

    Args:
        paths: module paths of the stage containers, in forward order (e.g. ``("layer1",
            "layer2")`` or ``("blocks.0", "blocks.1")``). Each must be an ``nn.Sequential`` or
            ``nn.ModuleList`` whose children the model's forward runs in order.
        skippable: a rule ``block -> bool``, or per stage the indices of skippable blocks.
    """

    paths: tuple[str, ...]
    skippable: SkippableRule

    def __post_init__(self) -> None:
        object.__setattr__(self, "paths", tuple(self.paths))
        if not self.paths:
            raise ConfigError("StageSpec needs at least one stage path, got none")
        if not callable(self.skippable):
            rule = tuple(tuple(int(i) for i in stage) for stage in self.skippable)
            if len(rule) != len(self.paths):
                raise ConfigError(
                    f"StageSpec.skippable lists {len(rule)} stages but paths has "
                    f"{len(self.paths)}: give one list of skippable block indices per stage"
                )
            object.__setattr__(self, "skippable", rule)


# Declarations by model class, like timm's model registry: declared once, found for every
# instance, so use_subnet, the samplers and the trainer work on the user's model unchanged.
_DECLARED: dict[type, StageSpec] = {}


def declare_stages(
    model_class: type, paths: Sequence[str], skippable: SkippableRule = None
) -> StageSpec:
    """Declare the stages of your own residual architecture.

    Args:
        model_class: the ``nn.Module`` subclass (instances of subclasses match too).
        paths: module paths of the stage containers, in forward order.
        skippable: ``block -> bool`` or per-stage lists of skippable indices; by default a
            block is skippable when it has a ``downsample`` attribute that is ``None`` or a
            ``has_skip`` attribute that is true.

    Returns:
        The registered spec.
    """
    if not (isinstance(model_class, type) and issubclass(model_class, nn.Module)):
        raise ConfigError(f"declare_stages needs an nn.Module subclass, got {model_class!r}")
    spec = StageSpec(tuple(paths), _identity_shortcut if skippable is None else skippable)
    _DECLARED[model_class] = spec
    return spec


def _identity_shortcut(block: nn.Module) -> bool:
    if hasattr(block, "has_skip"):
        return bool(block.has_skip)
    if hasattr(block, "downsample"):
        return block.downsample is None
    return False


def _resnet_skippable(block: nn.Module) -> bool:
    return getattr(block, "downsample", None) is None


def _has_skip(block: nn.Module) -> bool:
    return bool(getattr(block, "has_skip", False))


def _always(block: nn.Module) -> bool:
    return True


def _stage_paths_numbered(model: nn.Module, prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(count))


def _builtin_spec(model: nn.Module, family: str | None) -> StageSpec | None:
    """The spec of a family nestedtrain knows the stages of, or None."""
    if family == "cifar-resnet":
        return StageSpec(tuple(model.stage_names), _resnet_skippable)
    if family in ("timm-resnet", "torchvision-resnet"):
        paths = tuple(p for p in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, p))
        return StageSpec(paths, _resnet_skippable)
    if family in ("timm-efficientnet", "timm-mobilenetv3"):
        return StageSpec(_stage_paths_numbered(model, "blocks.", len(model.blocks)), _has_skip)
    if family == "timm-vit":
        return StageSpec(("blocks",), _always)
    return None  # DenseNets (no skippable blocks), declared models and unknown ones


# ------------------------------------------------------------------------------ families
# The one place that tells model families apart: stage discovery, WeightMap and the analyses
# all ask model_family, so a model declared with declare_stages reaches every one of them.
DECLARED_FAMILY = "declared"
RESNET_FAMILIES = ("cifar-resnet", "timm-resnet", "torchvision-resnet")
DENSENET_FAMILIES = ("timm-densenet", "torchvision-densenet")


def _builtin_family(model: nn.Module) -> str | None:
    # Imported lazily: each family's module is only needed when such a model is seen.
    import timm.models.densenet as timm_densenet
    import timm.models.efficientnet as timm_effnet
    import timm.models.mobilenetv3 as timm_mnv3
    import timm.models.resnet as timm_resnet
    import timm.models.vision_transformer as timm_vit
    import torchvision.models.densenet as tv_densenet
    import torchvision.models.resnet as tv_resnet

    from ..models.cifar_resnet import CifarResNet

    for cls, family in (
        (CifarResNet, "cifar-resnet"),
        (timm_resnet.ResNet, "timm-resnet"),
        (tv_resnet.ResNet, "torchvision-resnet"),
        (timm_effnet.EfficientNet, "timm-efficientnet"),
        (timm_mnv3.MobileNetV3, "timm-mobilenetv3"),
        (timm_vit.VisionTransformer, "timm-vit"),
        (timm_densenet.DenseNet, "timm-densenet"),
        (tv_densenet.DenseNet, "torchvision-densenet"),
    ):
        if isinstance(model, cls):
            return family
    return None


def _declared_spec(model: nn.Module) -> StageSpec | None:
    for cls in type(model).__mro__:
        if cls in _DECLARED:
            return _DECLARED[cls]
    return None


def model_family(model: nn.Module) -> str | None:
    """The family of ``model``, or None for a model nestedtrain does not know.

    A built-in family is named after its library and architecture: ``"cifar-resnet"``,
    ``"timm-resnet"``, ``"torchvision-resnet"``, ``"timm-efficientnet"``,
    ``"timm-mobilenetv3"``, ``"timm-vit"``, ``"timm-densenet"`` or
    ``"torchvision-densenet"``. It says what the model *is* (how its parameters are named),
    so it wins over a declaration, which only says where the stages are. A model of any other
    class declared with :func:`declare_stages` is ``"declared"``. DenseNets have no skippable
    blocks, so :func:`find_stages` refuses them; WeightMap and the loafing matrix know them.

    A ``DistributedDataParallel`` wrapper is looked through.
    """
    model = unwrap(model)
    family = _builtin_family(model)
    if family is None and _declared_spec(model) is not None:
        return DECLARED_FAMILY
    return family


SUPPORTED_FAMILIES = (
    "nestedtrain CIFAR ResNets (resnet20/32/44/56/110)",
    "timm ResNets",
    "torchvision ResNets",
    "timm EfficientNet",
    "timm MobileNetV3",
    "timm ViT/DeiT",
)


def _spec_for(model: nn.Module) -> StageSpec:
    spec = _declared_spec(model) or _builtin_spec(model, _builtin_family(model))
    if spec is None:
        raise ConfigError(
            f"cannot find the stages of a {type(model).__name__}: nestedtrain knows "
            f"{', '.join(SUPPORTED_FAMILIES)}; declare yours with "
            f"nestedtrain.declare_stages({type(model).__name__}, paths=[...stage containers...], "
            "skippable=rule) or pass spec=StageSpec(...)"
        )
    return spec


def _full_blocks(container: nn.Module) -> dict[str, nn.Module]:
    parked = container.__dict__.get(FULL_BLOCKS_ATTR)
    return dict(parked if parked is not None else container._modules)


def find_stages(model: nn.Module, spec: StageSpec | None = None) -> list[Stage]:
    """List the stages of ``model``, each with its blocks and which blocks are skippable.

    Args:
        model: a model of a supported family, one whose class was declared with
            :func:`declare_stages`, or any model when ``spec`` is given. A
            ``DistributedDataParallel`` wrapper is looked through.
        spec: an explicit declaration that overrides the family rules.

    Raises:
        ConfigError: for a model of an unknown family, or a spec that does not fit the model.
    """
    model = unwrap(model)
    spec = spec or _spec_for(model)
    stages = []
    for s, path in enumerate(spec.paths):
        try:
            container = model.get_submodule(path)
        except AttributeError as err:
            raise ConfigError(
                f"stage path {path!r} is not a submodule of {type(model).__name__}"
            ) from err
        if not isinstance(container, (nn.Sequential, nn.ModuleList)):
            raise ConfigError(
                f"stage {path!r} of {type(model).__name__} is a {type(container).__name__}; a "
                "stage must be an nn.Sequential or nn.ModuleList of blocks"
            )
        blocks = _full_blocks(container)
        if not blocks:
            raise ConfigError(f"stage {path!r} of {type(model).__name__} has no blocks")
        if callable(spec.skippable):
            skippable = tuple(bool(spec.skippable(b)) for b in blocks.values())
        else:
            listed = set(spec.skippable[s])
            bad = sorted(i for i in listed if not 0 <= i < len(blocks))
            if bad:
                raise ConfigError(
                    f"stage {path!r} has {len(blocks)} blocks; skippable index {bad[0]} is out "
                    f"of range 0..{len(blocks) - 1}"
                )
            skippable = tuple(i in listed for i in range(len(blocks)))
        stages.append(
            Stage(path, container, tuple(blocks.values()), tuple(blocks.keys()), skippable)
        )
    return stages


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel``/``DataParallel`` wrapper (or itself)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's wrapper
            model = model._orig_mod
        else:
            return model
