"""The loafing matrix: each trained model, and every smaller architecture run inside it.

Rows are trained models, columns architectures (those of the same models). A cell is the
column's architecture run inside the row's trained weights with BN statistics re-estimated
for it; the diagonal is each model's own accuracy with its own statistics; a column larger
than the row is empty. Network loafing shows as cells far below the diagonal of their column
(the papers' Fig. 1: resnet32 inside a trained resnet56 against resnet32 trained alone).

- Models with stages (ResNets of ours, timm and torchvision, and any model declared with
  ``declare_stages``): the smaller architecture inside a larger one is its ordered
  sub-network (resnet32 in resnet56 is ``5-5-5``; timm resnet18 in resnet34 is ``2-2-2-2``),
  evaluated in place.
- DenseNets (timm, torchvision): the smaller model gets the larger one's weights through the
  WeightMap (first layers of each dense block, leading channels), as in the ST appendix's
  DenseNet tables.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .. import bn as bn_tools
from ..elastic.matching import block_depths
from ..elastic.stages import (
    DENSENET_FAMILIES,
    SUPPORTED_FAMILIES,
    find_stages,
    model_family,
    unwrap,
)
from ..elastic.weightmap import inherit
from ..errors import ConfigError
from ..evaluation import DEFAULT_MEMORY_MB, CalibBatches, EvalBatches, evaluate, evaluate_subnets
from .subnets import match_subnet

__all__ = ["loafing_matrix"]

# How a cell runs a smaller architecture inside a trained model (the result's "family").
_SUBNET, _INHERIT = "resnet", "densenet"


@dataclass(frozen=True)
class _Column:
    """An architecture of the matrix: the first model of that architecture stands for it."""

    signature: tuple
    label: str
    model: nn.Module
    depths: tuple[int, ...]


def _signature(model: nn.Module) -> tuple:
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _check_family(models: Sequence[nn.Module], names: Sequence[str]) -> str:
    """How cells are run: ``"resnet"`` (ordered sub-networks) or ``"densenet"`` (inherited)."""
    described = ", ".join(f"{n} ({type(m).__name__})" for n, m in zip(names, models))
    dense = [model_family(m) in DENSENET_FAMILIES for m in models]
    if any(dense):
        if not all(dense) or len({type(m) for m in models}) > 1:
            raise ConfigError(f"a loafing matrix needs models of one family: got {described}")
        return _INHERIT
    for name, model in zip(names, models):
        try:
            find_stages(model)
        except ValueError:
            raise ConfigError(
                f"{name} is a {type(model).__name__}: a loafing matrix takes models whose stages "
                f"nestedtrain knows ({', '.join(SUPPORTED_FAMILIES)}, or any model declared with "
                "nestedtrain.declare_stages) or DenseNets (timm, torchvision)"
            ) from None
    kinds = {(type(m), len(find_stages(m))) for m in models}
    if len(kinds) > 1:
        raise ConfigError(
            "a loafing matrix needs models of one family (same class and number of stages): "
            f"got {described}"
        )
    return _SUBNET


def _check_labels(
    models: Sequence[nn.Module], names: Sequence[str], architectures: Sequence[str] | None
) -> list[str]:
    """The column label of each model, after checking there is one name and label each."""
    if not models:
        raise ConfigError("a loafing matrix needs at least one trained model")
    if len(names) != len(models):
        raise ConfigError(f"{len(names)} names for {len(models)} models: give one name per model")
    labels = list(names if architectures is None else architectures)
    if len(labels) != len(models):
        raise ConfigError(
            f"{len(labels)} architecture labels for {len(models)} models: give one each"
        )
    return labels


def _columns(models: Sequence[nn.Module], labels: Sequence[str]) -> list[_Column]:
    """One column per distinct architecture, in order of first appearance."""
    columns: list[_Column] = []
    for model, label in zip(models, labels):
        signature = _signature(model)
        if any(signature == column.signature for column in columns):
            continue
        if any(label == column.label for column in columns):
            label = f"{label} #{len(columns) + 1}"
        columns.append(_Column(signature, label, model, block_depths(model)))
    return columns


def loafing_matrix(
    models: Sequence[nn.Module],
    names: Sequence[str],
    eval_batches: EvalBatches,
    calib_batches: CalibBatches,
    architectures: Sequence[str] | None = None,
    chunk_images: int | None = None,
    memory_mb: float | None = DEFAULT_MEMORY_MB,
) -> dict[str, Any]:
    """Accuracy of every architecture of the list inside every trained model of the list.

    Args:
        models: trained models of one family.
        names: a row label per model.
        eval_batches, calib_batches: evaluation and calibration data, shared by all models.
        architectures: a column label per model (its architecture, e.g. ``"resnet32"``);
            models of identical architecture share a column. Defaults to ``names``.
        chunk_images, memory_mb: bound the memory, not the result (see
            :func:`~nestedtrain.evaluation.subnet_logits`).

    Returns:
        ``family`` (``"resnet"``: cells are ordered sub-networks, as for every model with
        stages; ``"densenet"``: inherited weights), ``models`` (row labels), ``architectures``
        (column labels), ``acc`` (rows of accuracies, ``None`` where the column does not fit
        in the row), ``how`` (per cell: ``"own"``, ``"subnet 5-5-5"``, ``"inherited"`` or
        ``None``) and ``depths``.

    Raises:
        ConfigError: models of different families, names that do not match the models, a
            same-depth pair that differs in width.
    """
    models = [unwrap(m) for m in models]
    labels = _check_labels(models, names, architectures)
    family = _check_family(models, names)
    columns = _columns(models, labels)
    acc: list[list[float | None]] = []
    how: list[list[str | None]] = []
    for model in models:
        cells, kinds = _row(
            model, columns, family, eval_batches, calib_batches, chunk_images, memory_mb
        )
        acc.append(cells)
        how.append(kinds)
    return {
        "family": family,
        "models": list(names),
        "architectures": [column.label for column in columns],
        "acc": acc,
        "how": how,
        "depths": {column.label: list(column.depths) for column in columns},
        "bn": "own statistics on the diagonal, re-estimated for every other cell",
    }


def _row(
    model: nn.Module,
    columns: Sequence[_Column],
    family: str,
    eval_batches: EvalBatches,
    calib_batches: CalibBatches,
    chunk_images: int | None,
    memory_mb: float | None,
) -> tuple[list[float | None], list[str | None]]:
    """One trained model's accuracies and how each was had, per column."""
    row_signature, row_depths = _signature(model), block_depths(model)
    cells: list[float | None] = [None] * len(columns)
    kinds: list[str | None] = [None] * len(columns)
    subnets = []
    for j, column in enumerate(columns):
        if column.signature == row_signature:
            cells[j], kinds[j] = evaluate(model, eval_batches())["acc"], "own"
        elif any(d > r for d, r in zip(column.depths, row_depths)):
            continue  # the column is no part of this (smaller) model
        elif family == _SUBNET:
            subnets.append((j, match_subnet(model, column.model)))
        else:
            cells[j], kinds[j] = _inherited_accuracy(
                model, column.model, eval_batches, calib_batches
            )
    if subnets:
        # All sub-networks of one row at once: they share their computed prefixes.
        results = evaluate_subnets(
            model, [s for _, s in subnets], eval_batches, calib_batches, chunk_images, memory_mb
        )
        for (j, subnet), result in zip(subnets, results):
            cells[j], kinds[j] = result["acc"], f"subnet {subnet}"
    return cells, kinds


def _inherited_accuracy(
    large: nn.Module,
    architecture: nn.Module,
    eval_batches: EvalBatches,
    calib_batches: CalibBatches,
) -> tuple[float, str]:
    # A copy of the column's model only provides the architecture: every tensor is overwritten
    # from the large model (inherit raises if one had no counterpart).
    small = copy.deepcopy(architecture)
    inherit(large, small)
    bn_tools.recalibrate(small, calib_batches())
    return evaluate(small, eval_batches())["acc"], "inherited"
