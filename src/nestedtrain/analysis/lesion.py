"""Lesion curves of a trained residual network: where does it loaf?

Veit et al. (2016, "Residual networks behave like ensembles of relatively shallow networks")
deleted blocks of a trained ResNet at test time: one at a time, then k at a time. A network
whose blocks can be deleted with little loss has blocks that do little work: the loafing the
ST papers train against. For each BN policy (``own``: the trained statistics, as Veit et al.;
``recalibrate``: re-estimated for every lesioned network from training images, as the ST
papers test sub-networks) this measures

- the accuracy after deleting each single skippable block (a stage keeps one block);
- for each ``k``, after deleting the ``k`` blocks whose single deletion costs most
  (``worst``), least (``best``), and ``k`` blocks drawn at random (seeded draws; mean, min,
  max), each order ranked by that policy's own single deletions;
- per skippable block, how much it changes what flows through it: the norm of its output
  minus its input (the residual branch as it reaches the next block) over the norm of its
  input (the skip path), per image, averaged over evaluation images in eval mode. Blocks with
  small ratios pass their input on nearly unchanged: the loafing candidates.

Every lesioned network is a Subnet, so all of them run through the shared-prefix evaluator
with its bounded memory (:func:`~nestedtrain.evaluation.evaluate_subnets`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..elastic.stages import Stage, find_stages, unwrap
from ..elastic.subnet import Subnet
from ..errors import ConfigError
from ..evaluation import DEFAULT_MEMORY_MB, CalibBatches, EvalBatches, evaluate_subnets
from ..modes import eval_mode
from .destruct import block_place

__all__ = ["LESION_BN", "lesion", "lesion_subnet", "lesionable_blocks", "residual_ratios"]

LESION_BN = ("own", "recalibrate")
_ORDERS = ("worst", "best")


def lesionable_blocks(stages: Sequence[Stage]) -> list[tuple[int, int]]:
    """``(stage, block)`` of every block that can be deleted alone: skippable, in a stage of
    more than one block."""
    return [
        (s, b)
        for s, stage in enumerate(stages)
        if len(stage) > 1
        for b, ok in enumerate(stage.skippable)
        if ok
    ]


def lesion_subnet(stages: Sequence[Stage], deleted: Sequence[tuple[int, int]]) -> Subnet:
    """The network without the ``(stage, block)`` blocks in ``deleted``."""
    gone = set(deleted)
    return Subnet(
        tuple(b for b in range(len(stage)) if (s, b) not in gone) for s, stage in enumerate(stages)
    )


def _fits(stages: Sequence[Stage], deleted: Sequence[tuple[int, int]]) -> bool:
    """Every stage keeps at least one block."""
    per_stage = [0] * len(stages)
    for s, _ in deleted:
        per_stage[s] += 1
    return all(n < len(stage) for n, stage in zip(per_stage, stages))


def _ranked(
    stages: Sequence[Stage], order: Sequence[tuple[int, int]], k: int
) -> list[tuple[int, int]]:
    """The first ``k`` blocks of ``order`` that can go together (a stage keeps one)."""
    chosen: list[tuple[int, int]] = []
    for block in order:
        if len(chosen) == k:
            break
        if _fits(stages, [*chosen, block]):
            chosen.append(block)
    return chosen


def _max_k(stages: Sequence[Stage], blocks: Sequence[tuple[int, int]]) -> int:
    return sum(
        min(sum(1 for s, _ in blocks if s == i), len(stage) - 1) for i, stage in enumerate(stages)
    )


def _random_sets(
    stages: Sequence[Stage], blocks: Sequence[tuple[int, int]], k: int, draws: int, seed: int
) -> list[list[tuple[int, int]]]:
    """``draws`` seeded draws of ``k`` blocks that can go together (uniform among those)."""
    rng = random.Random(f"nestedtrain-lesion:{k}:{seed}")
    out = []
    while len(out) < draws:
        chosen = sorted(rng.sample(list(blocks), k))
        if _fits(stages, chosen):  # rejection keeps the draw uniform over the fitting sets
            out.append(chosen)
    return out


@torch.no_grad()
def residual_ratios(
    model: nn.Module, eval_batches: EvalBatches, num_images: int = 1024
) -> dict[tuple[int, int], float]:
    """Per lesionable block, the mean over images of ``||block(x) - x|| / ||x||`` (see the
    module's docstring), in eval mode, over the first ``num_images`` evaluation images."""
    model = unwrap(model)
    stages = find_stages(model)
    sums = {key: 0.0 for key in lesionable_blocks(stages)}
    seen = 0

    def hook(key: tuple[int, int]):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0][:take].flatten(1).double()
            change = output[:take].flatten(1).double() - x
            ratio = change.norm(dim=1) / x.norm(dim=1).clamp_min(1e-12)
            sums[key] += float(ratio.sum())

        return record

    handles = [stages[s].blocks[b].register_forward_hook(hook((s, b))) for s, b in sums]
    try:
        with eval_mode(model):
            for images, _ in eval_batches():
                take = min(len(images), num_images - seen)
                if take <= 0:
                    break
                model(images[:take])
                seen += take
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise ConfigError("the residual-branch norms got no evaluation images")
    return {key: total / seen for key, total in sums.items()}


def lesion(
    model: nn.Module,
    eval_batches: EvalBatches,
    calib_batches: CalibBatches | None,
    ks: Sequence[int] | None = None,
    random_draws: int = 10,
    seed: int = 0,
    bn: Sequence[str] = LESION_BN,
    norm_images: int = 1024,
    chunk_images: int | None = None,
    memory_mb: float | None = DEFAULT_MEMORY_MB,
) -> dict[str, Any]:
    """Lesion curves and residual-branch ratios of a trained network (module docstring).

    Args:
        model, eval_batches: the trained main network, and a function that returns a fresh
            iterable of ``(images, labels)`` to evaluate on.
        calib_batches: returns training images; needed for ``"recalibrate"`` in ``bn``.
        ks: numbers of blocks deleted together (default: 1 up to all that can go).
        random_draws: seeded random draws per ``k`` (0: none).
        seed: seeds the draws.
        bn: the BN policies, of :data:`LESION_BN`.
        norm_images: evaluation images for the residual-branch ratios.
        chunk_images, memory_mb: bound the memory, not the result.

    Returns:
        ``blocks`` (per lesionable block: stage, block, whole-network index, ``norm_ratio``
        and per policy its ``acc`` and ``drop``), ``intact`` (per policy), ``curves`` (per
        policy, per ``k``: ``worst``, ``best``, ``random``), and the settings; accuracies in
        percent, drops in points (intact minus lesioned).

    Raises:
        ConfigError: an unknown policy, recalibration without calibration images, nothing
            to delete, a ``k`` out of range or a negative number of draws.
    """
    model = unwrap(model)
    stages = find_stages(model)
    blocks = lesionable_blocks(stages)
    ks = _check(bn, calib_batches, stages, blocks, ks, random_draws)
    full = lesion_subnet(stages, [])
    result: dict[str, Any] = {"bn": list(bn), "intact": {}, "curves": {}}
    singles: dict[str, dict[tuple[int, int], float]] = {}
    for policy in bn:
        calib = calib_batches if policy == "recalibrate" else None
        evaluate = _evaluator(model, eval_batches, calib, chunk_images, memory_mb)
        acc = evaluate([full, *(lesion_subnet(stages, [b]) for b in blocks)])
        intact = acc[full]
        singles[policy] = {b: acc[lesion_subnet(stages, [b])] for b in blocks}
        result["intact"][policy] = intact
        result["curves"][policy] = _curves(
            stages, blocks, singles[policy], intact, ks, random_draws, seed, evaluate
        )
    ratios = residual_ratios(model, eval_batches, norm_images)
    result["blocks"] = _block_rows(stages, blocks, singles, result["intact"], ratios)
    result.update(ks=list(ks), random_draws=random_draws, seed=seed, norm_images=norm_images)
    return result


def _check(bn, calib_batches, stages, blocks, ks, random_draws) -> list[int]:
    """The ``ks`` to run; refuses the settings :func:`lesion` cannot run."""
    for policy in bn:
        if policy not in LESION_BN:
            raise ConfigError(f"bn={policy!r}: use {' and/or '.join(LESION_BN)}")
    if "recalibrate" in bn and calib_batches is None:
        raise ConfigError("BN re-estimation needs calibration images (training images)")
    if not blocks:
        raise ConfigError(
            "nothing to delete: no stage has a skippable block beside another block ("
            + ", ".join(f"{st.name}: {len(st)} blocks" for st in stages)
            + ")"
        )
    if random_draws < 0:
        raise ConfigError(f"random draws {random_draws}: give 0 or more")
    limit = _max_k(stages, blocks)
    ks = list(range(1, limit + 1)) if ks is None else list(ks)
    for k in ks:
        if not 1 <= k <= limit:
            raise ConfigError(f"k={k}: between 1 and {limit} blocks can be deleted together")
    return ks


def _evaluator(model, eval_batches, calib, chunk_images, memory_mb):
    """``evaluate(subnets) -> {subnet: top-1}``, each network evaluated once per policy."""
    done: dict[Subnet, float] = {}

    def evaluate(subnets: Sequence[Subnet]) -> dict[Subnet, float]:
        todo = [s for s in dict.fromkeys(subnets) if s not in done]
        if todo:
            results = evaluate_subnets(model, todo, eval_batches, calib, chunk_images, memory_mb)
            done.update((s, r["acc"]) for s, r in zip(todo, results))
        return done

    return evaluate


def _curves(stages, blocks, single, intact, ks, draws, seed, evaluate) -> list[dict[str, Any]]:
    """Per ``k``: the ``worst``, ``best`` and ``random`` deletions, evaluated in one pass."""
    by_drop = sorted(blocks, key=lambda b: (single[b], b))  # most harmful first; ties: index
    chosen = {
        k: {
            "worst": _ranked(stages, by_drop, k),
            "best": _ranked(stages, by_drop[::-1], k),
            "random": _random_sets(stages, blocks, k, draws, seed),
        }
        for k in ks
    }
    wanted = [lesion_subnet(stages, c[o]) for c in chosen.values() for o in _ORDERS]
    wanted += [lesion_subnet(stages, r) for c in chosen.values() for r in c["random"]]
    acc = evaluate(wanted)
    rows = []
    for k, c in chosen.items():
        row: dict[str, Any] = {"k": k}
        for order in _ORDERS:
            subnet = lesion_subnet(stages, c[order])
            row[order] = {
                "deleted": [list(b) for b in c[order]],
                "subnet": str(subnet),
                "acc": acc[subnet],
                "drop": intact - acc[subnet],
            }
        row["random"] = _random_row([acc[lesion_subnet(stages, r)] for r in c["random"]], intact)
        rows.append(row)
    return rows


def _random_row(accs: list[float], intact: float) -> dict[str, Any] | None:
    if not accs:
        return None
    values = torch.tensor(accs, dtype=torch.float64)
    return {
        "draws": len(accs),
        "acc_mean": float(values.mean()),
        "acc_std": float(values.std()) if len(accs) > 1 else 0.0,
        "acc_min": float(values.min()),
        "acc_max": float(values.max()),
        "drop_mean": intact - float(values.mean()),
        "accs": accs,
    }


def _block_rows(stages, blocks, singles, intact, ratios) -> list[dict[str, Any]]:
    return [
        {
            **block_place(stages, s, b),
            "norm_ratio": ratios[s, b],
            **{
                policy: {"acc": acc[s, b], "drop": intact[policy] - acc[s, b]}
                for policy, acc in singles.items()
            },
        }
        for s, b in blocks
    ]
