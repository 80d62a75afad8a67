"""Accuracy of every sub-network of a sampling space, and of individually trained models.

The sub-networks come from :func:`nestedtrain.elastic.space_subnets` and are evaluated by
:func:`nestedtrain.evaluation.evaluate_subnets` (BN statistics re-estimated for each, each
block of the space's trie run once, memory within ``memory_mb`` whatever the number of
images); this module adds the summary over the space and the individually trained models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..elastic.sampling import OrderedSampler, space_subnets
from ..elastic.stages import find_stages, unwrap
from ..elastic.subnet import Subnet, export_subnet
from ..errors import ConfigError
from ..evaluation import DEFAULT_MEMORY_MB, CalibBatches, EvalBatches, evaluate, evaluate_subnets

__all__ = ["evaluate_space", "match_subnet", "subnet_stats"]


# ----------------------------------------------------------------------- the analysis
def subnet_stats(accuracies: Sequence[float]) -> dict[str, float]:
    """Count, max, mean, population standard deviation and min of accuracies."""
    if not accuracies:
        raise ConfigError("no accuracies to summarise")
    n = len(accuracies)
    mean = sum(accuracies) / n
    std = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / n)
    return {"count": n, "max": max(accuracies), "mean": mean, "std": std, "min": min(accuracies)}


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def match_subnet(main: nn.Module, other: nn.Module) -> Subnet:
    """The ordered sub-network of ``main`` whose architecture is ``other``'s.

    ``other`` matches when the standalone copy of that sub-network
    (:func:`~nestedtrain.elastic.export_subnet`) has exactly ``other``'s ``state_dict`` names
    and shapes: a resnet32 is the ``5-5-5`` of a resnet56.

    Raises:
        ConfigError: ``other`` is no sub-network of ``main``.
    """
    main, other = unwrap(main), unwrap(other)
    main_name, other_name = type(main).__name__, type(other).__name__
    try:
        other_stages = find_stages(other)
    except ValueError:
        raise ConfigError(
            f"the {other_name} has no stages nestedtrain knows, so it is no sub-network of the "
            f"main {main_name}"
        ) from None
    main_stages = find_stages(main)
    depths = [len(stage) for stage in other_stages]
    main_depths = [len(stage) for stage in main_stages]
    described = f"a {other_name} with depths {'-'.join(map(str, depths))}"
    if type(main) is not type(other) or len(depths) != len(main_depths):
        raise ConfigError(
            f"{described} is no sub-network of the main {main_name} "
            f"({'-'.join(map(str, main_depths))}): give a model of the same family"
        )
    if any(d > m for d, m in zip(depths, main_depths)):
        raise ConfigError(
            f"{described} is deeper than the main network "
            f"({'-'.join(map(str, main_depths))}) in some stage, so it is none of its sub-networks"
        )
    subnet = Subnet(tuple(range(d)) for d in depths)
    try:
        subnet.validate(main_stages)
    except ValueError as err:
        raise ConfigError(
            f"{described} is no ordered sub-network of the main network: {err}"
        ) from None
    if _shapes(export_subnet(main, subnet)) != _shapes(other):
        raise ConfigError(
            f"{described} has the depths of sub-network {subnet} of the main {main_name} but "
            "other tensor names or shapes (widths, classes): it is not that sub-network"
        )
    return subnet


def evaluate_space(
    model: nn.Module,
    eval_batches: EvalBatches,
    calib_batches: CalibBatches,
    space: Any = None,
    sample: int | None = None,
    seed: int = 0,
    individual: Sequence[tuple[str, nn.Module]] = (),
    chunk_images: int | None = None,
    memory_mb: float | None = DEFAULT_MEMORY_MB,
) -> dict[str, Any]:
    """Accuracy of every sub-network of an ordered sampling space, BN re-calibrated for each.

    Args:
        model: the main network.
        eval_batches, calib_batches: as for :func:`~nestedtrain.evaluation.evaluate_subnets`.
        space, sample, seed: which sub-networks (see
            :func:`~nestedtrain.elastic.space_subnets`).
        individual: ``(label, model)`` pairs of individually trained models, each of the
            architecture of one sub-network (see :func:`match_subnet`); each is evaluated
            with its own BN statistics, and its sub-network is evaluated inside ``model``
            even when the sample left it out.
        chunk_images, memory_mb: bound the memory, not the result (see
            :func:`~nestedtrain.evaluation.subnet_logits`).

    Returns:
        ``main`` (the model with its own BN statistics), ``subnets`` (per sub-network:
        ``subnet``, ``blocks``, ``acc``, ``acc5``, ``loss``, ``in_space``), ``stats`` (over
        the sub-networks of the space), ``individual``, and the selection.
    """
    model = unwrap(model)
    chosen = space_subnets(model, space, sample, seed)
    space_size = len(OrderedSampler(model, max_drop=space))
    matched = [(label, other, match_subnet(model, other)) for label, other in individual]
    extra = [s for _, _, s in matched if s not in chosen]
    extra = list(dict.fromkeys(extra))
    subnets = chosen + extra
    results = evaluate_subnets(model, subnets, eval_batches, calib_batches, chunk_images, memory_mb)
    rows = _subnet_rows(subnets, results, chosen)
    individual_rows = _individual_rows(matched, eval_batches, rows)
    main = evaluate(model, eval_batches())
    return {
        "space": "full" if space is None else space,
        "space_size": space_size,
        "sample": sample,
        "seed": seed,
        "bn": "recalibrated per sub-network",
        "main": main,
        "subnets": rows,
        "stats": subnet_stats([row["acc"] for row in rows if row["in_space"]]),
        "individual": individual_rows,
    }


def _subnet_rows(
    subnets: Sequence[Subnet], results: Sequence[dict[str, Any]], chosen: Sequence[Subnet]
) -> list[dict[str, Any]]:
    """Each sub-network's evaluation ``results`` with its ``blocks``, ``depths`` and whether
    it is ``in_space`` (one of ``chosen``)."""
    rows = []
    for subnet, result in zip(subnets, results):
        rows.append(
            {
                **result,
                "blocks": subnet.num_blocks,
                "depths": list(subnet.depths),
                "in_space": subnet in chosen,
            }
        )
    return rows


def _individual_rows(
    matched: Sequence[tuple[str, nn.Module, Subnet]],
    eval_batches: EvalBatches,
    rows: Sequence[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Per individually trained model: its own accuracy (its own BN statistics) beside the
    accuracy of its sub-network inside the main network (``acc_inside``, from ``rows``)."""
    by_subnet = {row["subnet"]: row for row in rows}
    individual_rows = []
    for label, other, subnet in matched:
        own = evaluate(other, eval_batches())
        individual_rows.append(
            {
                "label": label,
                "subnet": str(subnet),
                "acc": own["acc"],
                "acc5": own["acc5"],
                "acc_inside": by_subnet[str(subnet)]["acc"],
            }
        )
    return individual_rows
