"""Sub-network samplers: ordered and stochastic residual sampling, named sampling spaces, and the
sub-networks of a space or a recipe's selection, listed.

Samplers draw from a ``torch.Generator`` the caller passes, never from the global RNG, so
every rank of a distributed run that shares the generator's seed draws the same Subnets; a
listing's seeded sample draws from a generator of its own.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from typing import Union

import torch
from torch import nn

from ..errors import ConfigError
from .stages import Stage, StageSpec, find_stages, unwrap
from .subnet import Subnet

__all__ = [
    "OrderedSampler",
    "StochasticSampler",
    "SAMPLING_SPACES",
    "build_sampler",
    "space_subnets",
    "subnets_from_spec",
]

# Named spaces: the most blocks each stage may drop. "space3" is the ST++ reference code's
# best inter-stage rule for ResNet-50 (stages 1-4 drop at most 0, 1, 3 and 0 blocks).
SAMPLING_SPACES: dict[str, tuple[int, ...]] = {"space3": (0, 1, 3, 0)}

MaxDrop = Union[None, int, str, Sequence[int]]


class OrderedSampler:
    """Ordered residual sampling: per stage drop the last ``c`` blocks, ``c`` uniform in
    ``0..max_drop``, stages independent; the full network is one of the draws.

    Args:
        model: the main network.
        max_drop: ``None`` (each stage may drop all its trailing skippable blocks, keeping at
            least one block), an int applied to every stage (capped at what it can drop), a
            per-stage sequence, or a name from ``SAMPLING_SPACES``.
        spec: explicit stage declaration, if the model's family is not built in.
    """

    def __init__(self, model: nn.Module, max_drop: MaxDrop = None, spec: StageSpec | None = None):
        self.stages = find_stages(model, spec)
        self.max_drop = _resolve_max_drop(self.stages, max_drop)

    def __len__(self) -> int:
        return math.prod(c + 1 for c in self.max_drop)

    def _subnet(self, drops: Sequence[int]) -> Subnet:
        return Subnet(tuple(range(len(st) - c)) for st, c in zip(self.stages, drops))

    def sample(self, generator: torch.Generator) -> Subnet:
        """One Subnet; consumes one draw per stage from ``generator``."""
        drops = [int(torch.randint(0, c + 1, (1,), generator=generator)) for c in self.max_drop]
        return self._subnet(drops)

    def smallest(self) -> Subnet:
        """The shallowest Subnet of the space: every stage drops its most."""
        return self._subnet(self.max_drop)

    def all(self) -> list[Subnet]:
        """Every Subnet of the space, deepest first."""
        ranges = [range(c + 1) for c in self.max_drop]
        return [self._subnet(drops) for drops in itertools.product(*ranges)]


class StochasticSampler:
    """Stochastic residual sampling: each skippable block kept with probability ``p``.

    Non-skippable blocks always run; a draw that would empty a stage is redrawn for that stage.
    """

    def __init__(self, model: nn.Module, p: float = 0.5, spec: StageSpec | None = None):
        if not 0.0 < p <= 1.0:
            raise ConfigError(f"keep probability p={p} must be in (0, 1]")
        self.stages = find_stages(model, spec)
        self.p = float(p)

    def __len__(self) -> int:
        total = 1
        for stage in self.stages:
            free = sum(stage.skippable)
            # every subset of skippable blocks, less the empty stage when all are skippable
            total *= 2**free - (1 if free == len(stage) else 0)
        return total

    def sample(self, generator: torch.Generator) -> Subnet:
        """One Subnet; draws from ``generator`` only."""
        kept_per_stage = []
        for stage in self.stages:
            skippable = torch.tensor(stage.skippable)
            while True:
                keep = (torch.rand(len(stage), generator=generator) < self.p) | ~skippable
                if keep.any():
                    break
            kept_per_stage.append(tuple(int(i) for i in keep.nonzero().flatten()))
        return Subnet(kept_per_stage)

    def smallest(self) -> Subnet:
        """The shallowest Subnet of the space: the blocks that cannot be skipped, or a stage's
        first block where all can."""
        kept = []
        for stage in self.stages:
            fixed = tuple(i for i, ok in enumerate(stage.skippable) if not ok)
            kept.append(fixed or (0,))
        return Subnet(kept)

    def all(self) -> list[Subnet]:
        """Every Subnet of the space."""
        per_stage = []
        for stage in self.stages:
            free = [i for i, ok in enumerate(stage.skippable) if ok]
            fixed = [i for i, ok in enumerate(stage.skippable) if not ok]
            options = []
            for n in range(len(free), -1, -1):
                for chosen in itertools.combinations(free, n):
                    kept = tuple(sorted(fixed + list(chosen)))
                    if kept:
                        options.append(kept)
            per_stage.append(options)
        return [Subnet(choice) for choice in itertools.product(*per_stage)]


def _resolve_max_drop(stages: Sequence[Stage], max_drop: MaxDrop) -> tuple[int, ...]:
    allowed = tuple(stage.num_trailing_skippable for stage in stages)
    if max_drop is None or max_drop == "full":
        return allowed
    if isinstance(max_drop, str):
        if max_drop not in SAMPLING_SPACES:
            raise ConfigError(
                f"unknown sampling space {max_drop!r}: use 'full', one of "
                f"{sorted(SAMPLING_SPACES)}, or a per-stage list of how many blocks may drop"
            )
        max_drop = SAMPLING_SPACES[max_drop]
    if isinstance(max_drop, int):
        if max_drop < 0:
            raise ConfigError(f"max_drop={max_drop} must be >= 0")
        return tuple(min(max_drop, a) for a in allowed)
    max_drop = tuple(int(c) for c in max_drop)
    if len(max_drop) != len(stages):
        raise ConfigError(
            f"max_drop {list(max_drop)} has {len(max_drop)} entries but the model has "
            f"{len(stages)} stages"
        )
    for s, (c, a, stage) in enumerate(zip(max_drop, allowed, stages)):
        if not 0 <= c <= a:
            raise ConfigError(
                f"max_drop {list(max_drop)}: stage {s + 1} ({stage.name}) can drop 0..{a} "
                f"trailing blocks, got {c}"
            )
    return max_drop


def build_sampler(
    model: nn.Module,
    kind: str = "ordered",
    space: MaxDrop = None,
    p: float = 0.5,
    spec: StageSpec | None = None,
) -> OrderedSampler | StochasticSampler:
    """A sampler by name: ``ordered`` (with a ``space``) or ``stochastic`` (with ``p``)."""
    if kind == "ordered":
        return OrderedSampler(model, max_drop=space, spec=spec)
    if kind == "stochastic":
        if space not in (None, "full"):
            raise ConfigError(
                f"sampling space {space!r} applies to ordered sampling only; stochastic "
                "sampling takes p"
            )
        return StochasticSampler(model, p=p, spec=spec)
    raise ConfigError(f"unknown sampler {kind!r}: use 'ordered' or 'stochastic'")


def space_subnets(
    model: nn.Module,
    space: MaxDrop = None,
    sample: int | None = None,
    seed: int = 0,
    keep_shallowest: bool = False,
) -> list[Subnet]:
    """The ordered sub-networks of a sampling space, or a seeded sample of ``sample`` of them.

    Args:
        model: the main network.
        space: ``None``/``"full"`` (every ordered depth), a name from ``SAMPLING_SPACES``
            (``"space3"``), an int or per-stage list of how many trailing blocks may drop.
        sample: this many, drawn without replacement (all when the space is not larger);
            kept in the space's order, deepest first.
        seed: seeds the sample.
        keep_shallowest: the sample always holds the space's shallowest sub-network (and
            ``sample - 1`` drawn from the rest), as recipes' ``sample:N`` does.
    """
    everything = OrderedSampler(unwrap(model), max_drop=space).all()
    if sample is not None and sample < 1:
        raise ConfigError(f"sample={sample}: evaluate at least 1 sub-network")
    if sample is None or sample >= len(everything):
        return everything
    g = torch.Generator().manual_seed(seed)
    pool = everything[:-1] if keep_shallowest else everything
    picks = torch.randperm(len(pool), generator=g)[: sample - keep_shallowest].sort().values
    chosen = [pool[i] for i in picks.tolist()]
    return [*chosen, everything[-1]] if keep_shallowest else chosen


def subnets_from_spec(model: nn.Module, spec: str, seed: int = 0) -> list[Subnet]:
    """Sub-networks named by a CLI/recipe string.

    ``none``; ``all`` (the whole ordered space, the full network included); ``sample:N`` (N
    of the ordered space, seeded, always including the shallowest; all of it when it has at
    most N); or a comma-separated list of Subnet strings.
    """
    spec = str(spec).strip()
    if spec in ("none", ""):
        return []
    if spec == "all":
        return space_subnets(model)
    if spec.startswith("sample:"):
        match = re.fullmatch(r"sample:(\d+)", spec)
        if not match or int(match.group(1)) < 1:
            raise ConfigError(f"sub-network selection {spec!r}: write sample:N with N >= 1")
        return space_subnets(model, sample=int(match.group(1)), seed=seed, keep_shallowest=True)
    return [Subnet.parse(unwrap(model), text) for text in spec.split(",")]
