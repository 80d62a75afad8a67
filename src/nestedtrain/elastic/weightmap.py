"""WeightMap: where a small model sits inside a larger model of the same family.

Motivation training keeps a *base* model and a larger *motivated* model that contains it; a
switch copies weights, buffers and optimizer state from the active model into the other. The
map says, for every tensor of the base model's ``state_dict``, which slice of which motivated
tensor holds it, by the Motivation paper's rules (:mod:`nestedtrain.elastic.matching`: stages
block by block, every dimension by its leading entries, with a ViT's fused ``qkv`` and a
DenseNet layer's concatenated input matched part by part).

The same map also fills a small model from a larger trained one (:func:`inherit`), as in the
DenseNet loafing tables of the stimulative-training papers."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .matching import block_renamer, check_pair, fixed_dims, merge_segments, segment_rule
from .stages import FULL_BLOCKS_ATTR, unwrap

__all__ = ["QKV_MODES", "TensorMap", "WeightMap", "inherit"]

# A slice of a tensor: one ``slice`` per dimension (``()`` for a 0-dim tensor).
Index = tuple[slice, ...]

QKV_MODES = ("split", "literal")

# Optimizer state that its optimizer does not start at zero. timm's RMSpropTF starts the
# squared-gradient average at one (as TensorFlow does); a zero there would make the first
# motivated step of a differential weight divide by ~sqrt(eps).
_STATE_INIT = {("RMSpropTF", "square_avg"): 1.0}


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
        self.family = check_pair(base, motivated)
        self._base, self._motivated = base, motivated
        base_sd = _state_tensors(base, "base")
        motivated_sd = _state_tensors(motivated, "motivated")
        self._base_shapes = {k: tuple(v.shape) for k, v in base_sd.items()}
        self._motivated_shapes = {k: tuple(v.shape) for k, v in motivated_sd.items()}

        rename = block_renamer(self.family, base, motivated)
        segments = segment_rule(self.family, base, motivated, qkv)
        self.tensors: dict[str, TensorMap] = {}
        self.unmatched: list[str] = []
        for name, base_shape in self._base_shapes.items():
            motivated_name = rename(name)
            motivated_shape = self._motivated_shapes.get(motivated_name)
            if motivated_shape is None or len(motivated_shape) != len(base_shape):
                self.unmatched.append(name)
                continue
            if any(base_shape[d] != motivated_shape[d] for d in fixed_dims(name, base_shape)):
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
                per_dim[dim] = merge_segments(dim_segments)
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
