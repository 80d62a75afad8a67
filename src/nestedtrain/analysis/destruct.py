"""Destroying a trained residual network at test time: delete blocks, or permute them.

The destruction test of the stimulative-training paper (its §4.3 and appendix C.3): the
accuracy drop, against the intact network, when

- deleting each single skippable block;
- deleting ``k`` skippable blocks (every combination, or a seeded sample when there are more);
- permuting blocks within a stage (every permutation needing ``k`` transpositions, or a sample).

Blocks that are not skippable (a stage's down-sampling block) are never deleted or moved; a
permutation reorders the skippable blocks between two of them, as the appendix's Table r2
does. Its ``k`` counts transpositions the way that table does: a permutation of a stage is
made of ``k`` transpositions when it needs ``k`` and no fewer (``len - cycles``), so a 3-cycle
of three blocks counts 2, and ``k`` transpositions spread over stages add up.

**BatchNorm.** The appendix (C.2) states that every sub-network is tested with its BN
statistics re-estimated, and a destroyed network is a sub-network, so that is the default
(``bn="recalibrate"``); ``bn="own"`` keeps the trained model's statistics instead, as a
lesion study without re-estimation would. The intact network is evaluated the same way, so
deleting nothing drops exactly nothing.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..elastic.stages import Stage, find_stages, unwrap
from ..elastic.subnet import Subnet
from ..errors import ConfigError
from ..evaluation import DEFAULT_MEMORY_MB, CalibBatches, EvalBatches, evaluate_subnets
from .subnets import subnet_stats

__all__ = [
    "BN_POLICIES",
    "KINDS",
    "block_place",
    "destroyed_subnets",
    "destruct",
    "swap_subnet",
]

BN_POLICIES = ("recalibrate", "own")
KINDS = ("delete", "permute")  # the two ways to destroy a network: delete or reorder blocks


# ---------------------------------------------------------------------- combinatorics
@functools.cache
def _stirling1(n: int, k: int) -> int:
    """Unsigned Stirling number of the first kind: permutations of n with k cycles."""
    if n == k:
        return 1
    if k <= 0 or k > n:
        return 0
    return _stirling1(n - 1, k - 1) + (n - 1) * _stirling1(n - 1, k)


def _permutations_with_cycles(m: int, cycles: int) -> Iterator[tuple[int, ...]]:
    """Every permutation of ``range(m)`` (as images ``p[i]``) with exactly ``cycles`` cycles.

    Built as the recurrence counts them: ``m - 1`` is a fixed point of a permutation of the
    rest with one cycle fewer, or is inserted after ``i`` in a cycle of one with as many.
    """
    if m == 0:
        if cycles == 0:
            yield ()
        return
    if cycles <= 0:
        return
    for p in _permutations_with_cycles(m - 1, cycles - 1):
        yield (*p, m - 1)
    for p in _permutations_with_cycles(m - 1, cycles):
        for i in range(m - 1):
            q = [*p, p[i]]
            q[i] = m - 1
            yield tuple(q)


def _sample_permutation(m: int, cycles: int, rng: random.Random) -> tuple[int, ...]:
    """A uniformly drawn permutation of ``range(m)`` with exactly ``cycles`` cycles."""
    if m == 0:
        return ()
    if rng.randrange(_stirling1(m, cycles)) < _stirling1(m - 1, cycles - 1):
        return (*_sample_permutation(m - 1, cycles - 1, rng), m - 1)
    q = list(_sample_permutation(m - 1, cycles, rng))
    i = rng.randrange(m - 1)
    q.append(q[i])
    q[i] = m - 1
    return tuple(q)


@dataclass(frozen=True)
class _Unit:
    """Blocks of one stage that a destruction changes together.

    For deletion: the stage's skippable blocks, of which ``j`` are deleted. For permutation:
    a run of skippable blocks between non-skippable ones, reordered by ``j`` transpositions.
    """

    kind: str  # "delete" or "permute"
    stage: int
    blocks: tuple[int, ...]
    max_k: int

    def ways(self, j: int) -> int:
        if not 0 <= j <= self.max_k:
            return 0
        m = len(self.blocks)
        return math.comb(m, j) if self.kind == "delete" else _stirling1(m, m - j)

    def all(self, j: int) -> Iterator[tuple[int, ...]]:
        """Deleted blocks, or the blocks in their new run order."""
        if self.kind == "delete":
            yield from itertools.combinations(self.blocks, j)
            return
        m = len(self.blocks)
        for p in _permutations_with_cycles(m, m - j):
            yield tuple(self.blocks[i] for i in p)

    def sample(self, j: int, rng: random.Random) -> tuple[int, ...]:
        if self.kind == "delete":
            return tuple(sorted(rng.sample(self.blocks, j)))
        m = len(self.blocks)
        return tuple(self.blocks[i] for i in _sample_permutation(m, m - j, rng))


class _Space:
    """Every way to spread ``k`` deletions (or transpositions) over the units."""

    def __init__(self, units: Sequence[_Unit]):
        self.units = list(units)
        self._counts: dict[tuple[int, int], int] = {}

    def count(self, i: int, k: int) -> int:
        """How many ways units ``i..`` take ``k`` deletions or transpositions in all."""
        if i == len(self.units):
            return 1 if k == 0 else 0
        if (i, k) not in self._counts:
            unit = self.units[i]
            self._counts[i, k] = sum(
                unit.ways(j) * self.count(i + 1, k - j) for j in range(min(k, unit.max_k) + 1)
            )
        return self._counts[i, k]

    def all(self, i: int, k: int) -> Iterator[list[tuple[_Unit, tuple[int, ...]]]]:
        if i == len(self.units):
            if k == 0:
                yield []
            return
        unit = self.units[i]
        for j in range(min(k, unit.max_k) + 1):
            if not self.count(i + 1, k - j):
                continue
            for choice in unit.all(j):
                for rest in self.all(i + 1, k - j):
                    yield [(unit, choice), *rest]

    def sample(self, k: int, rng: random.Random) -> list[tuple[_Unit, tuple[int, ...]]]:
        out = []
        for i, unit in enumerate(self.units):
            weights = [
                unit.ways(j) * self.count(i + 1, k - j) for j in range(min(k, unit.max_k) + 1)
            ]
            draw = rng.randrange(sum(weights))
            j = 0
            while draw >= weights[j]:
                draw -= weights[j]
                j += 1
            out.append((unit, unit.sample(j, rng)))
            k -= j
        return out


def _subnet(stages: Sequence[Stage], changes: list[tuple[_Unit, tuple[int, ...]]]) -> Subnet:
    orders = [list(range(len(stage))) for stage in stages]
    deleted: set[tuple[int, int]] = set()
    for unit, choice in changes:
        if unit.kind == "delete":
            deleted.update((unit.stage, b) for b in choice)
        else:
            order = orders[unit.stage]
            for position, block in zip(unit.blocks, choice):
                order[position] = block
    return Subnet(
        tuple(b for b in order if (s, b) not in deleted) for s, order in enumerate(orders)
    )


# ---------------------------------------------------------------------------- choices
def _select_stages(stages: Sequence[Stage], selected: Sequence[int] | None) -> list[int]:
    """0-based indices of the stages to destroy, from 1-based stage numbers."""
    if selected is None:
        return list(range(len(stages)))
    out = []
    for number in selected:
        if not 1 <= number <= len(stages):
            raise ConfigError(
                f"stage {number} does not exist: the model has stages 1..{len(stages)} "
                f"({', '.join(stage.name for stage in stages)})"
            )
        out.append(number - 1)
    return sorted(set(out))


def _deletion_units(stages: Sequence[Stage], selected: Sequence[int]) -> list[_Unit]:
    units = []
    for s in selected:
        stage = stages[s]
        free = tuple(i for i, ok in enumerate(stage.skippable) if ok)
        # a stage keeps at least one block
        max_k = len(free) - 1 if len(free) == len(stage) else len(free)
        if max_k > 0:
            units.append(_Unit("delete", s, free, max_k))
    return units


def _segments(stage: Stage) -> list[tuple[int, ...]]:
    """Maximal runs of skippable blocks: a skippable block moves only within its run."""
    runs, run = [], []
    for i, ok in enumerate(stage.skippable):
        if ok:
            run.append(i)
        else:
            runs.append(tuple(run))
            run = []
    runs.append(tuple(run))
    return [r for r in runs if r]


def _permutation_units(stages: Sequence[Stage], selected: Sequence[int]) -> list[_Unit]:
    return [
        _Unit("permute", s, run, len(run) - 1)
        for s in selected
        for run in _segments(stages[s])
        if len(run) >= 2
    ]


def _describe(stages: Sequence[Stage], selected: Sequence[int]) -> str:
    return ", ".join(
        f"stage {s + 1} ({stages[s].name}: {len(stages[s])} blocks, "
        f"{sum(stages[s].skippable)} skippable)"
        for s in selected
    )


def _choose(
    units: list[_Unit],
    stages: Sequence[Stage],
    k: int,
    max_combinations: int | None,
    rng: random.Random,
) -> tuple[list[Subnet], int]:
    space = _Space(units)
    total = space.count(0, k)
    if max_combinations is None or total <= max_combinations:
        return [_subnet(stages, changes) for changes in space.all(0, k)], total
    chosen: dict[Subnet, None] = {}
    while len(chosen) < max_combinations:
        chosen.setdefault(_subnet(stages, space.sample(k, rng)))
    return list(chosen), total


def _check_k(k: int, limit: int, what: str, stages, selected) -> None:
    if k < 0:
        raise ConfigError(f"k={k}: {what} needs k >= 0")
    if k > limit:
        raise ConfigError(
            f"k={k}: at most {limit} {what} in {_describe(stages, selected)}; use k <= {limit}"
        )


def _check_max(max_combinations: int | None) -> None:
    if max_combinations is not None and max_combinations < 1:
        raise ConfigError(f"max_combinations={max_combinations} must be >= 1 (or None for all)")


def destroyed_subnets(
    model: nn.Module,
    kind: str,
    k: int,
    max_combinations: int | None = None,
    seed: int = 0,
    stages: Sequence[int] | None = None,
) -> tuple[list[Subnet], int]:
    """The sub-networks destroyed by ``k`` deletions or transpositions, and how many there
    are in all.

    ``kind="delete"``: every way to delete ``k`` skippable blocks (``k=0`` is the intact
    network). ``kind="permute"``: every reordering of skippable blocks within stages that
    takes ``k`` transpositions and no fewer (non-skippable blocks stay in place). All of them,
    or ``max_combinations`` distinct ones drawn uniformly (seeded) when there are more;
    ``stages`` (numbered from 1) limits them to those stages.

    Raises:
        ConfigError: an unknown ``kind``; ``k`` larger than what can be deleted (every stage
            keeps one block) or transposed; no stage (of ``stages``) with two blocks to swap.
    """
    if kind not in KINDS:
        raise ConfigError(f"kind={kind!r}: use one of {', '.join(KINDS)}")
    return _destroyed_subnets(model, kind, k, max_combinations, seed, stages)


def _destroyed_subnets(
    model: nn.Module,
    kind: str,
    k: int,
    max_combinations: int | None,
    seed: int,
    stages: Sequence[int] | None,
) -> tuple[list[Subnet], int]:
    all_stages = find_stages(unwrap(model))
    selected = _select_stages(all_stages, stages)
    _check_max(max_combinations)
    if kind == "delete":
        units = _deletion_units(all_stages, selected)
        what = "skippable blocks can be deleted"
    else:
        units = _permutation_units(all_stages, selected)
        if not units:
            raise ConfigError(
                f"nothing to permute in {_describe(all_stages, selected)}: a permutation needs "
                "a stage with two skippable blocks side by side"
            )
        what = "transpositions fit"
    _check_k(k, sum(u.max_k for u in units), what, all_stages, selected)
    rng = random.Random(f"nestedtrain-destruct:{kind}:{k}:{seed}")
    return _choose(units, all_stages, k, max_combinations, rng)


def swap_subnet(model: nn.Module, stage: int, first: int, second: int) -> Subnet:
    """The network with blocks ``first`` and ``second`` of stage ``stage`` (from 1) swapped.

    Raises:
        ConfigError: a one-block stage, a block swapped with itself, an index out of range,
            or a block that is not skippable (or would cross one that is not).
    """
    stages = find_stages(unwrap(model))
    (s,) = _select_stages(stages, [stage])
    st = stages[s]
    where = f"stage {stage} ({st.name})"
    if len(st) < 2:
        raise ConfigError(f"{where} has one block: there is nothing to permute in it")
    for i in (first, second):
        if not 0 <= i < len(st):
            raise ConfigError(f"{where} has blocks 0..{len(st) - 1}; block {i} does not exist")
    if first == second:
        raise ConfigError(
            f"swapping block {first} of {where} with itself changes nothing: give two "
            "different blocks"
        )
    order = list(range(len(st)))
    order[first], order[second] = order[second], order[first]
    blocks = [tuple(range(len(other))) for other in stages]
    blocks[s] = tuple(order)
    subnet = Subnet(blocks)
    try:
        subnet.validate(stages)
    except ValueError as err:
        raise ConfigError(f"cannot swap blocks {first} and {second} of {where}: {err}") from None
    return subnet


# ---------------------------------------------------------------------------- analysis
def destruct(
    model: nn.Module,
    eval_batches: EvalBatches,
    calib_batches: CalibBatches | None = None,
    delete_k: Sequence[int] = (1, 2, 3),
    permute_k: Sequence[int] = (1, 2, 3),
    max_combinations: int | None = 1000,
    seed: int = 0,
    bn: str = "recalibrate",
    stages: Sequence[int] | None = None,
    swaps: Sequence[tuple[int, int, int]] = (),
    chunk_images: int | None = None,
    memory_mb: float | None = DEFAULT_MEMORY_MB,
) -> dict[str, Any]:
    """Accuracy drops of a trained network when blocks are deleted or permuted.

    Args:
        model: the trained main network.
        eval_batches: returns a fresh iterable of ``(images, labels)``.
        calib_batches: returns training images; needed for ``bn="recalibrate"``.
        delete_k: numbers of blocks to delete together (``0`` is the intact network).
        permute_k: numbers of transpositions per permutation; empty to skip permutations.
        max_combinations: evaluate at most this many combinations per ``k`` (a seeded
            uniform sample); ``None`` for all.
        seed: seeds the samples.
        bn: ``"recalibrate"`` (BN statistics re-estimated for every network, the default, as
            the paper's appendix C.2 says of every tested sub-network) or ``"own"``.
        stages: stage numbers (from 1) to destroy; all by default.
        swaps: extra single transpositions ``(stage, block, block)`` to evaluate.
        chunk_images, memory_mb: bound the memory, not the result (see
            :func:`~nestedtrain.evaluation.subnet_logits`).

    Returns:
        ``intact`` accuracy, ``delete_one`` (per skippable block: its drop), ``delete`` and
        ``permute`` (per ``k``: total combinations, those evaluated, their drops and
        statistics), ``swaps``; drops in percentage points (intact minus destroyed).

    Raises:
        ConfigError: an unknown ``bn``, ``k`` too large, nothing skippable, a bad swap.
    """
    model = unwrap(model)
    _check_bn(bn, calib_batches)
    # 1. Every network to evaluate: each single deletion, every k, the swaps asked for.
    destroyed = _destroy(model, stages, delete_k, permute_k, swaps, max_combinations, seed)
    wanted = destroyed.subnets()
    # 2. All of them in one shared-prefix pass.
    calib = calib_batches if bn == "recalibrate" else None
    results = evaluate_subnets(model, wanted, eval_batches, calib, chunk_images, memory_mb)
    acc = {subnet: r["acc"] for subnet, r in zip(wanted, results)}
    # 3. Drops against the intact network.
    intact = acc[destroyed.full]
    return {
        "bn": bn,
        "intact": {"subnet": str(destroyed.full), "acc": intact},
        "max_combinations": max_combinations,
        "seed": seed,
        "stages": [s + 1 for s in destroyed.selected],
        **destroyed.drops(acc, intact),
    }


@dataclass(frozen=True)
class _Destroyed:
    """The networks that one :func:`destruct` evaluates, by how they were destroyed."""

    stages: list[Stage]  # every stage of the model
    selected: list[int]  # 0-based indices of the stages destroyed
    full: Subnet  # the intact network
    single: list[tuple[int, int, Subnet]]  # (stage, block, network) per block deleted alone
    deletions: list[tuple[int, list[Subnet], int]]  # (k, networks evaluated, how many in all)
    permutations: list[tuple[int, list[Subnet], int]]  # the same, for k transpositions
    swapped: list[tuple[tuple[int, int, int], Subnet]]  # ((stage, block, block), network)

    def subnets(self) -> list[Subnet]:
        """Every network to evaluate, each once, the intact one first."""
        wanted = [self.full, *(s for *_, s in self.single)]
        for _, subnets, _ in self.deletions + self.permutations:
            wanted.extend(subnets)
        wanted.extend(s for _, s in self.swapped)
        return list(dict.fromkeys(wanted))

    def drops(self, acc: dict[Subnet, float], intact: float) -> dict[str, Any]:
        """``delete_one``, ``delete``, ``permute`` and ``swaps``: each network's accuracy
        and its drop from ``intact``."""
        return {
            "delete_one": _delete_one_rows(self.stages, self.single, acc, intact),
            "delete": _per_k(self.deletions, acc, intact),
            "permute": _per_k(self.permutations, acc, intact),
            "swaps": [
                {"swap": f"{stage}:{i}:{j}", **_drop_row(subnet, acc, intact)}
                for (stage, i, j), subnet in self.swapped
            ],
        }


def _destroy(
    model: nn.Module,
    stages: Sequence[int] | None,
    delete_k: Sequence[int],
    permute_k: Sequence[int],
    swaps: Sequence[tuple[int, int, int]],
    max_combinations: int | None,
    seed: int,
) -> _Destroyed:
    """The networks :func:`destruct` evaluates (its arguments of the same names)."""
    all_stages = find_stages(model)
    selected = _select_stages(all_stages, stages)
    return _Destroyed(
        stages=all_stages,
        selected=selected,
        full=Subnet.full(model),
        single=_single_deletions(model, all_stages, selected, delete_k, permute_k),
        deletions=[
            (k, *_destroyed_subnets(model, "delete", k, max_combinations, seed, stages))
            for k in delete_k
        ],
        permutations=[
            (k, *_destroyed_subnets(model, "permute", k, max_combinations, seed, stages))
            for k in permute_k
        ],
        swapped=[(swap, swap_subnet(model, *swap)) for swap in swaps],
    )


def _check_bn(bn: str, calib_batches: CalibBatches | None) -> None:
    if bn not in BN_POLICIES:
        raise ConfigError(f"bn={bn!r}: use one of {list(BN_POLICIES)}")
    if bn == "recalibrate" and calib_batches is None:
        raise ConfigError("bn='recalibrate' needs calib_batches (training images)")


def _single_deletions(
    model: nn.Module,
    all_stages: Sequence[Stage],
    selected: Sequence[int],
    delete_k: Sequence[int],
    permute_k: Sequence[int],
) -> list[tuple[int, int, Subnet]]:
    """``(stage, block, sub-network)`` for each skippable block deleted alone."""
    units = _deletion_units(all_stages, selected)
    if not units and (delete_k or not permute_k):
        raise ConfigError(
            f"nothing can be deleted from {type(model).__name__}: {_describe(all_stages, selected)}"
            " have no skippable block that is not a stage's only block"
        )
    return [
        (unit.stage, b, _subnet(all_stages, [(unit, (b,))])) for unit in units for b in unit.blocks
    ]


def _drop_row(subnet: Subnet, acc: dict[Subnet, float], intact: float) -> dict[str, Any]:
    return {"subnet": str(subnet), "acc": acc[subnet], "drop": intact - acc[subnet]}


def block_place(stages: Sequence[Stage], s: int, b: int) -> dict[str, Any]:
    """Block ``b`` of stage ``s`` (both from 0) as the analyses' rows name it: ``stage`` (from
    1), ``stage_name``, ``block`` and ``index``, its number in the whole network from 1, stage
    after stage."""
    before = sum(len(stage) for stage in stages[:s])
    return {"stage": s + 1, "stage_name": stages[s].name, "block": b, "index": before + b + 1}


def _delete_one_rows(
    all_stages: Sequence[Stage],
    single: Sequence[tuple[int, int, Subnet]],
    acc: dict[Subnet, float],
    intact: float,
) -> list[dict[str, Any]]:
    return [
        {**block_place(all_stages, s, b), **_drop_row(subnet, acc, intact)}
        for s, b, subnet in single
    ]


def _per_k(
    entries: Sequence[tuple[int, list[Subnet], int]], acc: dict[Subnet, float], intact: float
) -> list[dict[str, Any]]:
    """Per ``k``: how many combinations there are, those evaluated, their drops."""
    out = []
    for k, subnets, total in entries:
        rows = [_drop_row(s, acc, intact) for s in subnets]
        out.append(
            {
                "k": k,
                "total": total,
                "evaluated": len(subnets),
                "sampled": len(subnets) < total,
                "stats": subnet_stats([row["drop"] for row in rows]),
                "results": rows,
            }
        )
    return out
