"""The one-at-a-time sub-network evaluation: the oracle the shared-prefix evaluator
(``nestedtrain.evaluation.evaluate_subnets``) is tested against, and the baseline
``bench/bench_analysis.py`` times it against."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from nestedtrain import bn
from nestedtrain.elastic.stages import unwrap
from nestedtrain.elastic.subnet import Subnet, use_subnet
from nestedtrain.evaluation import evaluate
from nestedtrain.modes import kept_modes


def evaluate_one_at_a_time(
    model: nn.Module,
    subnets: Sequence[Subnet | str],
    eval_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    calib_batches: Callable[[], Iterable[torch.Tensor]] | None,
) -> list[dict]:
    """Accuracy of each sub-network after re-estimating BN statistics for it (``None``: with
    the model's own), one whole sub-network after another; the model's BN statistics and
    modes are as they were after."""
    module = unwrap(model)
    saved = bn.save_stats(module)
    results = []
    try:
        with kept_modes(module):
            for subnet in subnets:
                if calib_batches is not None:
                    bn.recalibrate(module, calib_batches(), subnet)
                with use_subnet(module, subnet):
                    metrics = evaluate(module, eval_batches())
                results.append({"subnet": str(subnet), **metrics})
    finally:
        bn.load_stats(module, saved)
    return results
