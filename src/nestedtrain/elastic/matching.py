"""How a base model sits inside a larger motivated model of its family: the matching rules.

:class:`~nestedtrain.elastic.weightmap.WeightMap` applies them to every tensor. They follow the
Motivation paper:

- stages are matched block by block: ResNets map the base's first ``l-1`` blocks of a stage to
  the motivated model's first ``l-1`` and the base's last block to the motivated model's last;
  EfficientNet, ViT, DenseNet and models declared with ``declare_stages`` map the first ``l``
  blocks (dense layers) to the first ``l`` (:func:`block_renamer`);
- every dimension is matched by its leading entries (the first ``d`` of ``d'`` channels or
  embedding dimensions), but for kernel and token dimensions, which must agree
  (:func:`fixed_dims`), and two structured exceptions that keep the leading-entry idea where a
  tensor is a concatenation (:func:`segment_rule`): a ViT's fused ``qkv`` projection (q, k and
  v each by its leading rows, so the base's heads are the motivated model's first heads), and a
  DenseNet layer's concatenated input ([block input, layer 1 output, layer 2 output, ...], each
  part by its leading channels).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from .stages import (
    DECLARED_FAMILY,
    DENSENET_FAMILIES,
    RESNET_FAMILIES,
    find_stages,
    model_family,
    unwrap,
)

__all__ = [
    "SUPPORTED_WEIGHTMAP_FAMILIES",
    "Segment",
    "SegmentRule",
    "block_depths",
    "block_renamer",
    "check_pair",
    "fixed_dims",
    "merge_segments",
    "segment_rule",
]

SUPPORTED_WEIGHTMAP_FAMILIES = (
    "nestedtrain CIFAR ResNets",
    "timm ResNets",
    "torchvision ResNets",
    "timm EfficientNet",
    "timm ViT",
    "timm DenseNet",
    "torchvision DenseNet",
    "models declared with nestedtrain.declare_stages",
)
# The families of elastic.stages.model_family that a WeightMap maps (timm's MobileNetV3 is not).
_MAPPED_FAMILIES = (
    *RESNET_FAMILIES,
    "timm-efficientnet",
    "timm-vit",
    *DENSENET_FAMILIES,
    DECLARED_FAMILY,
)


# ViT tensors whose leading dimensions (batch, tokens) must agree; only the width may grow.
_VIT_TOKEN_TENSORS = ("cls_token", "pos_embed", "reg_token", "dist_token")


@dataclass(frozen=True)
class _Stage:
    """A block container, named by its ``state_dict`` prefix, with its blocks' keys."""

    prefix: str
    base_keys: tuple[str, ...]
    motivated_keys: tuple[str, ...]


def check_pair(base: nn.Module, motivated: nn.Module) -> str:
    """The family of two models a WeightMap can pair (same family and class, same classes).

    Raises:
        ConfigError: they are not.
    """
    families = [model_family(base), model_family(motivated)]
    for role, model, family in zip(("base", "motivated"), (base, motivated), families):
        if family not in _MAPPED_FAMILIES:
            known = "" if family is None else f" (family {family})"
            raise ConfigError(
                f"the {role} model is a {type(model).__name__}{known}, which WeightMap does not "
                f"map; it maps {', '.join(SUPPORTED_WEIGHTMAP_FAMILIES)}"
            )
    if families[0] != families[1] or type(base) is not type(motivated):
        raise ConfigError(
            f"base and motivated models must be of one family: got a {families[0]} "
            f"({type(base).__name__}) and a {families[1]} ({type(motivated).__name__})"
        )
    base_classes = getattr(base, "num_classes", None)
    motivated_classes = getattr(motivated, "num_classes", None)
    if base_classes != motivated_classes:
        raise ConfigError(
            f"base and motivated models must predict the same classes: base has "
            f"num_classes={base_classes}, motivated {motivated_classes}"
        )
    return families[0]


def _dense_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """A DenseNet's dense blocks, by their name under ``features``."""
    return [(n, b) for n, b in model.features.named_children() if n.startswith("denseblock")]


def _block_containers(family: str | None, model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Per block container (its ``state_dict`` prefix), its blocks' keys: a DenseNet's dense
    blocks and their layers, any other model's stages and their blocks."""
    if family in DENSENET_FAMILIES:
        return {f"features.{name}": tuple(block._modules) for name, block in _dense_blocks(model)}
    return {stage.name: stage.keys for stage in find_stages(model)}


def block_depths(model: nn.Module) -> tuple[int, ...]:
    """Blocks per stage as a WeightMap matches them (a DenseNet: layers per dense block).

    Raises:
        ConfigError: a model that is no DenseNet and has no stages nestedtrain knows.
    """
    model = unwrap(model)
    return tuple(len(keys) for keys in _block_containers(model_family(model), model).values())


def _stages(family: str, base: nn.Module, motivated: nn.Module) -> list[tuple[_Stage, str]]:
    """The block containers of both models with the rule that matches their blocks."""
    base_blocks = _block_containers(family, base)
    motivated_blocks = _block_containers(family, motivated)
    if list(base_blocks) != list(motivated_blocks):
        raise ConfigError(
            f"base and motivated {type(base).__name__}s must have the same stages: the base has "
            f"{list(base_blocks)}, the motivated one {list(motivated_blocks)}"
        )
    # ResNets keep a stage's last block last (see block_renamer); the others match leading ones.
    rule = "resnet" if family in RESNET_FAMILIES else "leading"
    stages = []
    for path, base_keys in base_blocks.items():
        stage = _Stage(path, base_keys, motivated_blocks[path])
        if len(stage.base_keys) > len(stage.motivated_keys):
            raise ConfigError(
                f"the base model is deeper than the motivated one in stage {path!r} "
                f"({len(stage.base_keys)} > {len(stage.motivated_keys)} blocks); the motivated "
                "model must have at least as many blocks in every stage"
            )
        stages.append((stage, rule))
    if family in RESNET_FAMILIES:
        _check_same_block_type(base, motivated, list(base_blocks))
    return stages


def _check_same_block_type(base: nn.Module, motivated: nn.Module, paths: list[str]) -> None:
    base_block = type(next(iter(base.get_submodule(paths[0]).children())))
    motivated_block = type(next(iter(motivated.get_submodule(paths[0]).children())))
    if base_block is not motivated_block:
        raise ConfigError(
            f"base and motivated ResNets use different blocks ({base_block.__name__} and "
            f"{motivated_block.__name__}); map e.g. resnet18 -> resnet34 or resnet50 -> resnet101"
        )


def block_renamer(family: str, base: nn.Module, motivated: nn.Module) -> Callable[[str], str]:
    """A function from a base ``state_dict`` name to its motivated name.

    Raises:
        ConfigError: the models' stages differ, or the base is deeper in one.
    """
    stages = _stages(family, base, motivated)
    renames: dict[str, dict[str, str]] = {}
    for stage, rule in stages:
        base_keys, motivated_keys = stage.base_keys, stage.motivated_keys
        if rule == "resnet" and len(base_keys) > 1:
            # First l-1 blocks to the first l-1, the last to the last. (A one-block stage maps
            # to block 0: that block holds the stage's down-sampling, the last one does not.)
            targets = list(motivated_keys[: len(base_keys) - 1]) + [motivated_keys[-1]]
        else:
            targets = list(motivated_keys[: len(base_keys)])
        renames[stage.prefix] = dict(zip(base_keys, targets))

    def rename(name: str) -> str:
        for prefix, keys in renames.items():
            if name.startswith(prefix + "."):
                key, _, rest = name[len(prefix) + 1 :].partition(".")
                if key in keys:
                    return f"{prefix}.{keys[key]}.{rest}"
        return name

    return rename


def fixed_dims(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Dimensions that must agree between base and motivated tensors."""
    if name in _VIT_TOKEN_TENSORS:
        return tuple(range(len(shape) - 1))  # batch and token positions; only width grows
    if len(shape) == 4:
        return (2, 3)  # a convolution kernel: a 3x3 is not the corner of a 5x5
    return ()


Segment = tuple[slice, slice]
SegmentRule = Callable[[str, tuple[int, ...], tuple[int, ...]], Mapping[int, list[Segment]]]


def segment_rule(family: str, base: nn.Module, motivated: nn.Module, qkv: str) -> SegmentRule:
    """Per tensor, the dimensions not matched by plain leading entries and their segments."""
    if family == "timm-vit" and qkv == "split":
        return _qkv_segments
    if family in DENSENET_FAMILIES:
        return _densenet_segments(base, motivated)
    return lambda name, base_shape, motivated_shape: {}


def _qkv_segments(
    name: str, base_shape: tuple[int, ...], motivated_shape: tuple[int, ...]
) -> dict[int, list[Segment]]:
    # The fused projection stacks q, k and v along dim 0; each keeps its leading rows, so the
    # base's heads are the motivated model's first heads when both have the same head size.
    if not name.endswith(("attn.qkv.weight", "attn.qkv.bias")):
        return {}
    if base_shape[0] % 3 or motivated_shape[0] % 3:
        raise ConfigError(
            f"{name!r} has {base_shape[0]} / {motivated_shape[0]} output rows, not 3 x width; "
            "use qkv='literal' for a qkv layout that is not [q; k; v]"
        )
    b, m = base_shape[0] // 3, motivated_shape[0] // 3
    return {0: [(slice(j * b, (j + 1) * b), slice(j * m, j * m + b)) for j in range(3)]}


def _densenet_segments(base: nn.Module, motivated: nn.Module) -> SegmentRule:
    blocks = [name for name, _ in _dense_blocks(base)]

    def geometry(model: nn.Module, block: str) -> tuple[int, int, int]:
        layers = list(model.features.get_submodule(block).children())
        return layers[0].conv1.in_channels, layers[0].conv2.out_channels, len(layers)

    geometries = {b: (geometry(base, b), geometry(motivated, b)) for b in blocks}
    norm_tensor = r"(?:weight|bias|running_mean|running_var)"
    layer_input = re.compile(
        rf"^features\.(denseblock\d+)\.denselayer(\d+)\.(?:norm1\.{norm_tensor}|conv1\.weight)$"
    )
    transition = re.compile(rf"^features\.transition(\d+)\.(?:norm\.{norm_tensor}|conv\.weight)$")
    final = re.compile(rf"^(?:features\.norm5\.{norm_tensor}|classifier\.weight)$")

    def segments(
        name: str, base_shape: tuple[int, ...], motivated_shape: tuple[int, ...]
    ) -> dict[int, list[Segment]]:
        # How many base layers' outputs the tensor's input holds besides the block input.
        if (match := layer_input.match(name)) is not None:
            block, previous = match.group(1), int(match.group(2)) - 1
        elif (match := transition.match(name)) is not None:
            block = f"denseblock{match.group(1)}"
            previous = geometries[block][0][2] if block in geometries else -1
        elif final.match(name):
            block = blocks[-1]
            previous = geometries[block][0][2]
        else:
            return {}
        if block not in geometries or previous < 0:
            return {}
        (base_in, base_growth, _), (motivated_in, motivated_growth, _) = geometries[block]
        if base_in > motivated_in or base_growth > motivated_growth:
            raise ConfigError(
                f"the base DenseNet is wider than the motivated one in {block}: block input "
                f"{base_in} vs {motivated_in}, growth {base_growth} vs {motivated_growth}"
            )
        # Concatenated input: [block input, output of layer 1, of layer 2, ...]; each part of
        # the base sits at the start of the same part of the motivated model.
        parts = [(slice(0, base_in), slice(0, base_in))]
        for t in range(previous):
            start_b, start_m = base_in + t * base_growth, motivated_in + t * motivated_growth
            parts.append(
                (slice(start_b, start_b + base_growth), slice(start_m, start_m + base_growth))
            )
        dim = 1 if name.endswith(("conv1.weight", "conv.weight", "classifier.weight")) else 0
        return {dim: parts}

    return segments


def merge_segments(segments: Iterable[Segment]) -> list[Segment]:
    """Join segments that continue each other in both tensors (fewer, larger copies)."""
    merged: list[Segment] = []
    for b, m in segments:
        if merged and merged[-1][0].stop == b.start and merged[-1][1].stop == m.start:
            last_b, last_m = merged[-1]
            merged[-1] = (slice(last_b.start, b.stop), slice(last_m.start, m.stop))
        else:
            merged.append((b, m))
    return merged
