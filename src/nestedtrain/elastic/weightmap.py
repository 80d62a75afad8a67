"""WeightMap: where a small model sits inside a larger model of the same family.

Motivation training keeps a *base* model and a larger *motivated* model that contains it; a
switch copies weights, buffers and optimizer state from the active model into the other. The
map says, for every tensor of the base model's ``state_dict``, which slice of which motivated
tensor holds it. It follows the Motivation paper's rules:

- stages are matched block by block: ResNets map the base's first ``l-1`` blocks of a stage to
  the motivated model's first ``l-1`` and the base's last block to the motivated model's last;
  EfficientNet, ViT, DenseNet and models declared with ``declare_stages`` map the first ``l``
  blocks (dense layers) to the first ``l``;
- every dimension is matched by its leading entries (the first ``d`` of ``d'`` channels or
  embedding dimensions), with two structured exceptions that keep the leading-entry idea
  where a tensor is a concatenation: a ViT's fused ``qkv`` projection (q, k and v each by its
  leading rows, so the base's heads are the motivated model's first heads), and a DenseNet
  layer's concatenated input ([block input, layer 1 output, layer 2 output, ...], each part by
  its leading channels).

The same map also fills a small model from a larger trained one (:func:`inherit`), as in the
DenseNet loafing tables of the stimulative-training papers.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError
from .stages import (
    DECLARED_FAMILY,
    DENSENET_FAMILIES,
    FULL_BLOCKS_ATTR,
    RESNET_FAMILIES,
    find_stages,
    model_family,
    unwrap,
)

__all__ = ["TensorMap", "WeightMap", "block_depths", "inherit", "SUPPORTED_WEIGHTMAP_FAMILIES"]

# A slice of a tensor: one ``slice`` per dimension (``()`` for a 0-dim tensor).
Index = tuple[slice, ...]

QKV_MODES = ("split", "literal")

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

# Optimizer state that its optimizer does not start at zero. timm's RMSpropTF starts the
# squared-gradient average at one (as TensorFlow does); a zero there would make the first
# motivated step of a differential weight divide by ~sqrt(eps).
_STATE_INIT = {("RMSpropTF", "square_avg"): 1.0}

# ViT tensors whose leading dimensions (batch, tokens) must agree; only the width may grow.
_VIT_TOKEN_TENSORS = ("cls_token", "pos_embed", "reg_token", "dist_token")


@dataclass(frozen=True)
class TensorMap:
    """One base tensor and where it lives in the motivated model.

    Attributes:
        base_name: the tensor's ``state_dict`` name in the base model.
        motivated_name: its ``state_dict`` name in the motivated model.
        pieces: ``(base_index, motivated_index)`` pairs; together the base indices cover the
            whole base tensor, and the motivated indices do not overlap.
    """

    base_name: str
    motivated_name: str
    pieces: tuple[tuple[Index, Index], ...]


@dataclass(frozen=True)
class _Stage:
    """A block container, named by its ``state_dict`` prefix, with its blocks' keys."""

    prefix: str
    base_keys: tuple[str, ...]
    motivated_keys: tuple[str, ...]


class WeightMap:
    """Map every tensor of a base model onto a slice of a larger motivated model.

    Args:
        base: the smaller model.
        motivated: the larger model of the same family (same class, more blocks and/or wider).
        qkv: how a ViT's fused ``qkv`` projection is matched: ``"split"`` (default) maps q, k
            and v each by its leading rows; ``"literal"`` applies the plain leading-entries
            rule to the fused tensor.

    Attributes:
        family: the family :func:`~nestedtrain.elastic.stages.model_family` reports, e.g.
            ``"timm-efficientnet"`` or ``"declared"``.
        tensors: per base ``state_dict`` name, its :class:`TensorMap`.
        unmatched: base tensors with no counterpart (no tensor of that name, a different
            number of dimensions, or a kernel/token dimension that differs). Empty for the
            supported pairs; such tensors are left alone by every copy.

    The models given here are remembered as the defaults of the copy methods. Copy outside
    any ``use_subnet`` block: inside one, a model's ``state_dict`` lacks the skipped blocks.

    Raises:
        ConfigError: models of different families or classes, a base that is larger than the
            motivated model in some stage or dimension, or two models of the same size.
    """

    def __init__(self, base: nn.Module, motivated: nn.Module, qkv: str = "split"):
        if qkv not in QKV_MODES:
            raise ConfigError(f"qkv must be one of {QKV_MODES}, got {qkv!r}")
        base, motivated = unwrap(base), unwrap(motivated)
        self.qkv = qkv
        self.family = _check_pair(base, motivated)
        self._base, self._motivated = base, motivated
        base_sd = _state_tensors(base, "base")
        motivated_sd = _state_tensors(motivated, "motivated")
        self._base_shapes = {k: tuple(v.shape) for k, v in base_sd.items()}
        self._motivated_shapes = {k: tuple(v.shape) for k, v in motivated_sd.items()}

        rename = _block_renamer(_stages(self.family, base, motivated))
        segments = _special_segments(self.family, base, motivated, qkv)
        self.tensors: dict[str, TensorMap] = {}
        self.unmatched: list[str] = []
        for name, base_shape in self._base_shapes.items():
            motivated_name = rename(name)
            motivated_shape = self._motivated_shapes.get(motivated_name)
            if motivated_shape is None or len(motivated_shape) != len(base_shape):
                self.unmatched.append(name)
                continue
            if any(base_shape[d] != motivated_shape[d] for d in _fixed_dims(name, base_shape)):
                self.unmatched.append(name)
                continue
            larger = [d for d, (b, m) in enumerate(zip(base_shape, motivated_shape)) if b > m]
            if larger:
                raise ConfigError(
                    f"the base model is larger than the motivated one: base tensor {name!r} has "
                    f"shape {base_shape} but motivated {motivated_name!r} has {motivated_shape} "
                    f"(dimension {larger[0]}); the motivated model must be at least as large "
                    "in every dimension"
                )
            # Leading entries along every dimension, except where a tensor is a concatenation.
            per_dim = [[(slice(0, b), slice(0, b))] for b in base_shape]
            for dim, dim_segments in segments(name, base_shape, motivated_shape).items():
                per_dim[dim] = _merge(dim_segments)
            pieces = tuple(
                (tuple(p[0] for p in combo), tuple(p[1] for p in combo))
                for combo in itertools.product(*per_dim)
            )
            self.tensors[name] = TensorMap(name, motivated_name, pieces)

        covered = {t.motivated_name for t in self.tensors.values()}
        same_size = covered == set(self._motivated_shapes) and all(
            self._base_shapes[t.base_name] == self._motivated_shapes[t.motivated_name]
            for t in self.tensors.values()
        )
        if same_size and not self.unmatched:
            raise ConfigError(
                f"base and motivated {type(base).__name__} have the same architecture, so there "
                "is nothing to motivate: pick a deeper or wider motivated model"
            )

    # -------------------------------------------------------------------------- copies
    def copy_to_motivated(
        self, base: nn.Module | None = None, motivated: nn.Module | None = None
    ) -> None:
        """Write the base model's weights and buffers into their motivated slices.

        Every other entry of the motivated model (its differential weights) is left as it is.
        """
        self._copy_tensors(base, motivated, to_motivated=True)

    def copy_to_base(
        self, motivated: nn.Module | None = None, base: nn.Module | None = None
    ) -> None:
        """Read the base model's weights and buffers back from their motivated slices."""
        self._copy_tensors(base, motivated, to_motivated=False)

    @torch.no_grad()
    def _copy_tensors(
        self, base: nn.Module | None, motivated: nn.Module | None, to_motivated: bool
    ) -> None:
        src_sd, dst_sd = self._lookup_directed(base, motivated, to_motivated)
        for tmap in self.tensors.values():
            src_name, dst_name, pieces = _directed(tmap, to_motivated)
            src, dst = src_sd[src_name], dst_sd[dst_name]
            for src_index, dst_index in pieces:
                dst[dst_index].copy_(src[src_index])

    @torch.no_grad()
    def copy_optimizer_state(
        self,
        src_opt: torch.optim.Optimizer,
        dst_opt: torch.optim.Optimizer,
        direction: str = "to_motivated",
        *,
        base: nn.Module | None = None,
        motivated: nn.Module | None = None,
    ) -> None:
        """Copy per-parameter optimizer state along the map.

        A state tensor shaped like its parameter (momentum, Adam moments, RMSprop averages,
        ...) is sliced like the parameter; any other state (``step``) is copied whole, and so
        is a param group's ``step`` (timm's LAMB keeps it there). State the destination lacks
        is created: zeros (the optimizer's own start value where it is not zero) with the
        mapped slice filled. State of differential parameters is never touched. A parameter
        without state in ``src_opt`` (never stepped) leaves its counterpart without state, so
        a switch followed by a switch back is the identity on the base's state.

        Args:
            src_opt: the optimizer of the model being switched away from.
            dst_opt: the optimizer of the model being switched to; same class as ``src_opt``.
            direction: ``"to_motivated"`` (``src_opt`` is the base's) or ``"to_base"``.
            base: the base model whose parameters ``src_opt``/``dst_opt`` hold; by default
                the one this map was built from. Likewise ``motivated``.

        Raises:
            ConfigError: an unknown direction, optimizers of different classes, or a mapped
                parameter that only one of the two optimizers holds.
        """
        _check_optimizers(src_opt, dst_opt, direction)
        to_motivated = direction == "to_motivated"
        src_sd, dst_sd = self._lookup_directed(base, motivated, to_motivated)
        src_groups, dst_groups = _groups_by_param(src_opt), _groups_by_param(dst_opt)
        copied_groups: set[tuple[int, int]] = set()
        for tmap in self.tensors.values():
            src_name, dst_name, pieces = _directed(tmap, to_motivated)
            src_p, dst_p = src_sd[src_name], dst_sd[dst_name]
            if not isinstance(src_p, nn.Parameter) or id(src_p) not in src_groups:
                continue  # a buffer, or a parameter the source optimizer does not train
            if id(dst_p) not in dst_groups:
                raise ConfigError(
                    f"parameter {src_name!r} is optimized by the source optimizer but its "
                    f"counterpart {dst_name!r} is not in the destination optimizer"
                )
            _copy_group_step(src_groups[id(src_p)], dst_groups[id(dst_p)], copied_groups)
            src_state = src_opt.state.get(src_p)
            if not src_state:
                dst_opt.state.pop(dst_p, None)  # never stepped: neither is its counterpart
                continue
            old = dst_opt.state.get(dst_p, {})
            dst_opt.state[dst_p] = _mapped_state(
                src_state, src_p, dst_p, old, pieces, type(dst_opt).__name__
            )

    # ------------------------------------------------------------------------- queries
    def differential(self, motivated: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Per motivated ``state_dict`` name, a bool mask that is True where the base has no
        counterpart (the *differential* weights and buffers, trained only while motivated).

        Args:
            motivated: a model to place the masks on its tensors' devices (and to check its
                shapes against the map); by default masks are on the CPU.
        """
        devices: dict[str, torch.device] = {}
        if motivated is not None:
            _, motivated_sd = self._lookup(self._base, motivated)
            devices = {k: v.device for k, v in motivated_sd.items()}
        masks = {
            name: torch.ones(shape, dtype=torch.bool, device=devices.get(name, "cpu"))
            for name, shape in self._motivated_shapes.items()
        }
        for tmap in self.tensors.values():
            for _, motivated_index in tmap.pieces:
                masks[tmap.motivated_name][motivated_index] = False
        return masks

    def _lookup(
        self, base: nn.Module | None, motivated: nn.Module | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        base = self._base if base is None else unwrap(base)
        motivated = self._motivated if motivated is None else unwrap(motivated)
        base_sd, motivated_sd = _state_tensors(base, "base"), _state_tensors(motivated, "motivated")
        for role, sd, shapes in (
            ("base", base_sd, self._base_shapes),
            ("motivated", motivated_sd, self._motivated_shapes),
        ):
            extra = sorted(set(sd) - set(shapes))
            if extra:
                raise ConfigError(
                    f"the {role} model does not fit this WeightMap: it has tensors the map was "
                    f"not built with, e.g. {extra[0]!r}; build the map from these models"
                )
            for name, shape in shapes.items():
                tensor = sd.get(name)
                if tensor is None or tuple(tensor.shape) != shape:
                    found = "missing" if tensor is None else f"shaped {tuple(tensor.shape)}"
                    raise ConfigError(
                        f"the {role} model does not fit this WeightMap: its tensor {name!r} is "
                        f"{found}, expected shape {shape}; build the map from these models"
                    )
        return base_sd, motivated_sd

    def _lookup_directed(
        self, base: nn.Module | None, motivated: nn.Module | None, to_motivated: bool
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The source and destination ``state_dict`` tensors of a copy."""
        base_sd, motivated_sd = self._lookup(base, motivated)
        return (base_sd, motivated_sd) if to_motivated else (motivated_sd, base_sd)

    def __repr__(self) -> str:
        return (
            f"WeightMap(family={self.family!r}, qkv={self.qkv!r}, tensors={len(self.tensors)}, "
            f"unmatched={len(self.unmatched)})"
        )


def inherit(large: nn.Module, small: nn.Module, qkv: str = "split") -> WeightMap:
    """Fill ``small`` with the weights and buffers of a larger trained model of its family.

    This is how an analysis runs a smaller architecture as the sub-network of a larger one
    (e.g. DenseNet-121 inside a trained DenseNet-169).

    Returns:
        The :class:`WeightMap` used (``small`` as base, ``large`` as motivated).

    Raises:
        ConfigError: as :class:`WeightMap` does, and when some tensor of ``small`` has no
            counterpart in ``large`` (it would keep its initial values).
    """
    weight_map = WeightMap(small, large, qkv=qkv)
    if weight_map.unmatched:
        raise ConfigError(
            f"cannot fill every tensor of the small {type(unwrap(small)).__name__} from the "
            f"large one: no counterpart for {weight_map.unmatched[:5]}"
            + (
                f" and {len(weight_map.unmatched) - 5} more"
                if len(weight_map.unmatched) > 5
                else ""
            )
        )
    weight_map.copy_to_base(large, small)
    return weight_map


# ------------------------------------------------------------------------------ families
def _check_pair(base: nn.Module, motivated: nn.Module) -> str:
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
    # ResNets keep a stage's last block last (see _block_renamer); the others match leading ones.
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


def _block_renamer(stages: list[tuple[_Stage, str]]) -> Callable[[str], str]:
    """A function from a base ``state_dict`` name to its motivated name."""
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


def _fixed_dims(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Dimensions that must agree between base and motivated tensors."""
    if name in _VIT_TOKEN_TENSORS:
        return tuple(range(len(shape) - 1))  # batch and token positions; only width grows
    if len(shape) == 4:
        return (2, 3)  # a convolution kernel: a 3x3 is not the corner of a 5x5
    return ()


Segment = tuple[slice, slice]
SegmentRule = Callable[[str, tuple[int, ...], tuple[int, ...]], Mapping[int, list[Segment]]]


def _special_segments(family: str, base: nn.Module, motivated: nn.Module, qkv: str) -> SegmentRule:
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


def _merge(segments: Iterable[Segment]) -> list[Segment]:
    """Join segments that continue each other in both tensors (fewer, larger copies)."""
    merged: list[Segment] = []
    for b, m in segments:
        if merged and merged[-1][0].stop == b.start and merged[-1][1].stop == m.start:
            last_b, last_m = merged[-1]
            merged[-1] = (slice(last_b.start, b.stop), slice(last_m.start, m.stop))
        else:
            merged.append((b, m))
    return merged


# ------------------------------------------------------------------------------- helpers
def _state_tensors(model: nn.Module, role: str) -> dict[str, torch.Tensor]:
    """``state_dict`` names to the live parameters and buffers (not detached copies)."""
    for name, module in model.named_modules():
        if FULL_BLOCKS_ATTR in module.__dict__:
            raise ConfigError(
                f"the {role} model is running a sub-network (use_subnet is active on "
                f"{name or 'the model'}); map weights outside the use_subnet block"
            )
    return model.state_dict(keep_vars=True)


def _directed(tmap: TensorMap, to_motivated: bool) -> tuple[str, str, list[tuple[Index, Index]]]:
    """Source name, destination name and ``(source index, destination index)`` pieces."""
    if to_motivated:
        return tmap.base_name, tmap.motivated_name, list(tmap.pieces)
    return tmap.motivated_name, tmap.base_name, [(m, b) for b, m in tmap.pieces]


def _check_optimizers(
    src_opt: torch.optim.Optimizer, dst_opt: torch.optim.Optimizer, direction: str
) -> None:
    if direction not in ("to_motivated", "to_base"):
        raise ConfigError(f"direction must be 'to_motivated' or 'to_base', got {direction!r}")
    if type(src_opt) is not type(dst_opt):
        raise ConfigError(
            f"cannot copy {type(src_opt).__name__} state into a {type(dst_opt).__name__}: "
            "give the base and motivated models optimizers of the same class"
        )


def _copy_group_step(src_group: dict, dst_group: dict, copied: set[tuple[int, int]]) -> None:
    """Copy a param group's ``step`` (timm's LAMB keeps it there) once per pair of groups."""
    if (id(src_group), id(dst_group)) not in copied and "step" in src_group:
        dst_group["step"] = _clone_like(src_group["step"], dst_group.get("step"))
        copied.add((id(src_group), id(dst_group)))


def _mapped_state(
    src_state: Mapping[str, object],
    src_p: torch.Tensor,
    dst_p: torch.Tensor,
    old: Mapping[str, object],
    pieces: Sequence[tuple[Index, Index]],
    optimizer_name: str,
) -> dict[str, object]:
    """The destination parameter's new state.

    A state tensor shaped like its parameter is sliced along the map into the destination's
    old one, or into a fresh one at the optimizer's start value; anything else is copied whole.
    """
    new = {}
    for key, value in src_state.items():
        if torch.is_tensor(value) and src_p.dim() > 0 and value.shape == src_p.shape:
            target = old.get(key)
            if not (torch.is_tensor(target) and target.shape == dst_p.shape):
                fill = _STATE_INIT.get((optimizer_name, key), 0.0)
                target = torch.full(dst_p.shape, fill, dtype=value.dtype, device=dst_p.device)
            for src_index, dst_index in pieces:
                target[dst_index].copy_(value[src_index])
            new[key] = target
        else:
            new[key] = _clone_like(value, old.get(key))
    return new


def _groups_by_param(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


def _clone_like(value: object, existing: object) -> object:
    """A copy of ``value``; a tensor goes to the device of the state it replaces."""
    if torch.is_tensor(value):
        device = existing.device if torch.is_tensor(existing) else value.device
        return value.detach().clone().to(device)
    return copy.deepcopy(value)
