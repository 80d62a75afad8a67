"""Subnet: which blocks of each stage run, in which order; run one, or cut one out.

One string form is used everywhere (CLI, logs, JSON): stages joined by ``-``; a bare number
``d`` is the first d blocks of the stage; indices joined by ``.`` list the blocks in run order,
with a trailing ``.`` for a single index. ``5-9-3`` is ordered, ``0.1.2-0.2-3`` has a gap in
stage 2, ``0.2.1-4-3.`` reorders stage 1 and keeps only block 3 of stage 3.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from ..errors import ConfigError
from .stages import FULL_BLOCKS_ATTR, Stage, StageSpec, find_stages, unwrap

__all__ = ["Subnet", "use_subnet", "export_subnet"]


class Subnet:
    """Per stage, the indices of the blocks to run, in run order. Immutable and hashable."""

    __slots__ = ("_blocks",)

    def __init__(self, blocks: Sequence[Sequence[int]]):
        blocks = tuple(tuple(int(i) for i in stage) for stage in blocks)
        if not blocks:
            raise ConfigError("a Subnet needs at least one stage, got none")
        object.__setattr__(self, "_blocks", blocks)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Subnet is immutable")

    @property
    def blocks(self) -> tuple[tuple[int, ...], ...]:
        """Per stage, block indices in run order."""
        return self._blocks

    # ----------------------------------------------------------------------------- builders
    @classmethod
    def full(cls, model: nn.Module, spec: StageSpec | None = None) -> Subnet:
        """Every block of every stage, in order: the main network."""
        return cls(tuple(range(len(stage))) for stage in find_stages(model, spec))

    @classmethod
    def ordered(
        cls, model: nn.Module, depths: Sequence[int], spec: StageSpec | None = None
    ) -> Subnet:
        """The first ``depths[s]`` blocks of each stage ``s``, validated against ``model``."""
        subnet = cls(tuple(range(int(d))) for d in depths)
        subnet.validate(find_stages(model, spec))
        return subnet

    @classmethod
    def parse(cls, model: nn.Module, text: str, spec: StageSpec | None = None) -> Subnet:
        """Read the string form (see the module docstring), validated against ``model``."""
        subnet = cls.from_string(text)
        subnet.validate(find_stages(model, spec))
        return subnet

    @classmethod
    def from_string(cls, text: str) -> Subnet:
        """Read the string form without checking it against a model."""
        text = str(text).strip()
        stages = []
        for s, part in enumerate(text.split("-")):
            try:
                if "." in part:
                    indices = part[:-1] if part.endswith(".") else part
                    stages.append(tuple(int(i) for i in indices.split(".")))
                else:
                    stages.append(tuple(range(int(part))))
            except ValueError:
                raise ConfigError(
                    f"cannot read sub-network {text!r}: stage {s + 1} is {part!r}; write a depth "
                    "('3') or block indices in run order ('0.2.1', or '2.' for one block), stages "
                    "joined by '-', e.g. '3-2-4'"
                ) from None
        return cls(stages)

    # ---------------------------------------------------------------------------- queries
    @property
    def is_ordered(self) -> bool:
        """True when every stage runs its first d blocks in order."""
        return all(stage == tuple(range(len(stage))) for stage in self._blocks)

    @property
    def depths(self) -> tuple[int, ...]:
        """Blocks per stage of an ordered Subnet."""
        if not self.is_ordered:
            raise ConfigError(f"sub-network {self} is not ordered, so it has no depths")
        return tuple(len(stage) for stage in self._blocks)

    @property
    def num_blocks(self) -> int:
        return sum(len(stage) for stage in self._blocks)

    def is_full(self, model_or_stages: nn.Module | Sequence[Stage]) -> bool:
        stages = _stages(model_or_stages)
        return self._blocks == tuple(tuple(range(len(st))) for st in stages)

    def validate(self, stages: Sequence[Stage]) -> None:
        """Check this Subnet against a model's stages.

        Raises:
            ConfigError: naming the stage and block: wrong number of stages, an empty stage, an
                index out of range or repeated, a non-skippable block dropped or moved.
        """
        if len(self._blocks) != len(stages):
            raise ConfigError(
                f"sub-network {self} has {len(self._blocks)} stages but the model has "
                f"{len(stages)} ({'-'.join(str(len(st)) for st in stages)} blocks)"
            )
        for s, (kept, stage) in enumerate(zip(self._blocks, stages)):
            where = f"sub-network {self}, stage {s + 1} ({stage.name})"
            if not kept:
                raise ConfigError(f"{where}: every stage keeps at least one block, got none")
            for i in kept:
                if not 0 <= i < len(stage):
                    raise ConfigError(
                        f"{where}: block {i} is out of range, the stage has blocks "
                        f"0..{len(stage) - 1}"
                    )
            if len(set(kept)) != len(kept):
                repeated = next(i for i in kept if kept.count(i) > 1)
                raise ConfigError(f"{where}: block {repeated} is listed twice")
            fixed = [i for i, ok in enumerate(stage.skippable) if not ok]
            for i in fixed:
                if i not in kept:
                    raise ConfigError(
                        f"{where}: block {i} is not skippable (its shortcut is not the identity)"
                        " and cannot be dropped"
                    )
            # A skippable block may move only between the same non-skippable neighbours, and
            # the non-skippable blocks keep their order: shapes then fit wherever it runs.
            last_fixed = -1
            for i in kept:
                if not stage.skippable[i]:
                    expected = next(j for j in fixed if j > last_fixed)
                    if i != expected:
                        raise ConfigError(
                            f"{where}: block {i} is not skippable and cannot be moved"
                        )
                    last_fixed = i
                elif max((j for j in fixed if j < i), default=-1) != last_fixed:
                    raise ConfigError(
                        f"{where}: block {i} cannot move across a non-skippable block "
                        f"({', '.join(map(str, fixed))})"
                    )

    # ----------------------------------------------------------------------- value object
    def __str__(self) -> str:
        parts = []
        for stage in self._blocks:
            if stage == tuple(range(len(stage))):
                parts.append(str(len(stage)))
            elif len(stage) == 1:
                parts.append(f"{stage[0]}.")
            else:
                parts.append(".".join(str(i) for i in stage))
        return "-".join(parts)

    def __repr__(self) -> str:
        return f"Subnet('{self}')"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Subnet) and self._blocks == other._blocks

    def __hash__(self) -> int:
        return hash(self._blocks)

    def __lt__(self, other: Subnet) -> bool:
        return self._blocks < other._blocks

    def __reduce__(self):
        return (Subnet, (self._blocks,))


def _stages(model_or_stages: nn.Module | Sequence[Stage]) -> Sequence[Stage]:
    if isinstance(model_or_stages, nn.Module):
        return find_stages(model_or_stages)
    return model_or_stages


def _as_subnet(subnet: Subnet | str | Sequence[Sequence[int]]) -> Subnet:
    if isinstance(subnet, Subnet):
        return subnet
    if isinstance(subnet, str):
        return Subnet.from_string(subnet)
    return Subnet(subnet)


@contextmanager
def use_subnet(
    model: nn.Module,
    subnet: Subnet | str | Sequence[Sequence[int]],
    stages: Sequence[Stage] | None = None,
) -> Iterator[nn.Module]:
    """Run only ``subnet`` of ``model`` inside the ``with`` body.

    Each stage container temporarily holds just the kept blocks, in run order, under their
    original keys, so parameter names never change and skipped blocks take no part in the
    forward (and get no gradient). Works in train and eval mode, with or without grad; the
    model is restored on exit, also when the body raises. Nested use applies the inner Subnet
    to the whole model and restores the outer one on exit.

    Args:
        model: the model (a DDP wrapper is looked through; call the wrapper in the body).
        subnet: a Subnet, its string form, or per-stage index tuples.
        stages: ``find_stages(model)``, to skip re-discovering them on a hot path.

    Yields:
        ``model`` itself.
    """
    stages = find_stages(model) if stages is None else stages
    subnet = _as_subnet(subnet)
    subnet.validate(stages)
    with swapped_blocks(stages, subnet.blocks):
        yield model


@contextmanager
def swapped_blocks(stages: Sequence[Stage], kept: Sequence[Sequence[int]]) -> Iterator[None]:
    """Let each stage container hold only the ``kept`` block indices, in that order, under
    their original keys, and restore it on exit. No validation: :func:`use_subnet` is the
    public way in; an analysis may empty stages (``kept`` of ``()``) to run blocks itself.

    The full blocks are parked on the container meanwhile, so :func:`find_stages` (and a
    nested swap) still sees the whole model.
    """
    previous = []
    try:
        for stage, indices in zip(stages, kept):
            container = stage.container
            previous.append(
                (container, container._modules, container.__dict__.get(FULL_BLOCKS_ATTR))
            )
            container.__dict__[FULL_BLOCKS_ATTR] = dict(zip(stage.keys, stage.blocks))
            # Replacing the dict (not editing it) keeps the full one intact for restoring.
            container._modules = {stage.keys[i]: stage.blocks[i] for i in indices}
        yield
    finally:
        for container, modules, parked in reversed(previous):
            container._modules = modules
            if parked is None:
                container.__dict__.pop(FULL_BLOCKS_ATTR, None)
            else:
                container.__dict__[FULL_BLOCKS_ATTR] = parked


def export_subnet(model: nn.Module, subnet: Subnet | str | Sequence[Sequence[int]]) -> nn.Module:
    """A standalone copy of ``model`` that holds only the blocks of ``subnet``, renumbered.

    The result is a plain module of the model's own class: its ``state_dict`` loads into a
    model of that architecture with those depths (an ordered ``5-5-5`` of our resnet56 is
    exactly a resnet32), so saving and loading it needs no nestedtrain.
    """
    model = unwrap(model)
    stages = find_stages(model)
    subnet = _as_subnet(subnet)
    subnet.validate(stages)
    paths = [stage.name for stage in stages]
    with use_subnet(model, Subnet.full(model), stages):
        # Copy with the full blocks in place, then cut each stage down in the copy.
        exported = copy.deepcopy(model)
    for path, kept in zip(paths, subnet.blocks):
        container = exported.get_submodule(path)
        container.__dict__.pop(FULL_BLOCKS_ATTR, None)
        blocks = list(container._modules.values())
        container._modules = {str(n): blocks[i] for n, i in enumerate(kept)}
    return exported
