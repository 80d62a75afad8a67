"""The loafing matrix: each trained model, and every smaller architecture run inside it.

Rows are trained models, columns architectures (those of the same models). A cell is the
column's architecture run inside the row's trained weights with BN statistics re-estimated
for it; the diagonal is each model's own accuracy with its own statistics; a column larger
than the row is empty. Network loafing shows as cells far below the diagonal of their column
(the papers' Fig. 1: resnet32 inside a trained resnet56 against resnet32 trained alone).

- ResNets (ours, timm, torchvision): the smaller architecture inside a larger one is its
  ordered sub-network (resnet32 in resnet56 is ``5-5-5``; timm resnet18 in resnet34 is
  ``2-2-2-2``), evaluated in place.
- DenseNets (timm, torchvision): the smaller model gets the larger one's weights through the
  WeightMap (first layers of each dense block, leading channels), as in the ST appendix's
  DenseNet tables.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn

from .. import bn as bn_tools
from ..elastic.stages import find_stages, unwrap
from ..elastic.weightmap import inherit
from ..engine.evaluate import evaluate
from .subnets import (
    DEFAULT_MEMORY_MB,
    CalibBatches,
    EvalBatches,
    evaluate_subnets_shared,
    match_subnet,
)

__all__ = ["loafing_matrix"]


def _signature(model: nn.Module) -> tuple:
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _is_densenet(model: nn.Module) -> bool:
    import timm.models.densenet as timm_densenet
    import torchvision.models.densenet as tv_densenet

    return isinstance(model, (timm_densenet.DenseNet, tv_densenet.DenseNet))


def _dense_depths(model: nn.Module) -> tuple[int, ...]:
    return tuple(
        len(list(block.children()))
        for name, block in model.features.named_children()
        if name.startswith("denseblock")
    )


def _depths(model: nn.Module) -> tuple[int, ...]:
    if _is_densenet(model):
        return _dense_depths(model)
    return tuple(len(stage) for stage in find_stages(model))


def _check_family(models: Sequence[nn.Module], names: Sequence[str]) -> str:
    dense = [_is_densenet(m) for m in models]
    if any(dense):
        if not all(dense) or len({type(m) for m in models}) > 1:
            raise ValueError(
                "a loafing matrix needs models of one family: got "
                + ", ".join(f"{n} ({type(m).__name__})" for n, m in zip(names, models))
            )
        return "densenet"
    for name, model in zip(names, models):
        try:
            find_stages(model)
        except ValueError:
            raise ValueError(
                f"{name} is a {type(model).__name__}: a loafing matrix takes ResNets (ours, timm, "
                "torchvision) or DenseNets (timm, torchvision)"
            ) from None
    kinds = {(type(m), len(find_stages(m))) for m in models}
    if len(kinds) > 1:
        raise ValueError(
            "a loafing matrix needs models of one family (same class and number of stages): "
            "got " + ", ".join(f"{n} ({type(m).__name__})" for n, m in zip(names, models))
        )
    return "resnet"


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
            :func:`~nestedtrain.analysis.subnets.subnet_logits`).

    Returns:
        ``models`` (row labels), ``architectures`` (column labels), ``acc`` (rows of
        accuracies, ``None`` where the column does not fit in the row), ``how`` (per cell:
        ``"own"``, ``"subnet 5-5-5"``, ``"inherited"`` or ``None``) and ``depths``.

    Raises:
        ValueError: models of different families, names that do not match the models, a
            same-depth pair that differs in width.
    """
    models = [unwrap(m) for m in models]
    if not models:
        raise ValueError("a loafing matrix needs at least one trained model")
    if len(names) != len(models):
        raise ValueError(f"{len(names)} names for {len(models)} models: give one name per model")
    architectures = list(names if architectures is None else architectures)
    if len(architectures) != len(models):
        raise ValueError(
            f"{len(architectures)} architecture labels for {len(models)} models: give one each"
        )
    family = _check_family(models, names)
    columns: list[tuple[tuple, str, nn.Module]] = []
    for model, label in zip(models, architectures):
        signature = _signature(model)
        if any(signature == sig for sig, _, _ in columns):
            continue
        if any(label == other for _, other, _ in columns):
            label = f"{label} #{len(columns) + 1}"
        columns.append((signature, label, model))
    acc: list[list[float | None]] = []
    how: list[list[str | None]] = []
    for model in models:
        row_sig, row_depths = _signature(model), _depths(model)
        cells: list[float | None] = [None] * len(columns)
        kinds: list[str | None] = [None] * len(columns)
        subnets = []
        for j, (signature, _, arch) in enumerate(columns):
            depths = _depths(arch)
            if signature == row_sig:
                cells[j], kinds[j] = evaluate(model, eval_batches())["acc"], "own"
            elif any(d > r for d, r in zip(depths, row_depths)):
                continue  # the column is no part of this (smaller) model
            elif family == "resnet":
                subnets.append((j, match_subnet(model, arch)))
            else:
                cells[j], kinds[j] = _inherited_accuracy(model, arch, eval_batches, calib_batches)
        if subnets:
            results = evaluate_subnets_shared(
                model,
                [s for _, s in subnets],
                eval_batches,
                calib_batches,
                chunk_images,
                memory_mb,
            )
            for (j, subnet), result in zip(subnets, results):
                cells[j], kinds[j] = result["acc"], f"subnet {subnet}"
        acc.append(cells)
        how.append(kinds)
    return {
        "family": family,
        "models": list(names),
        "architectures": [label for _, label, _ in columns],
        "acc": acc,
        "how": how,
        "depths": {label: list(_depths(arch)) for _, label, arch in columns},
        "bn": "own statistics on the diagonal, re-estimated for every other cell",
    }


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
