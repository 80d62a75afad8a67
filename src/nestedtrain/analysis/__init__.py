"""Loafing analyses of trained residual networks, and run reports.

- :func:`evaluate_space`: accuracy of every ordered sub-network (BN re-calibrated), evaluated
  with shared prefixes (:func:`nestedtrain.evaluation.evaluate_subnets`, exact and
  much faster than one at a
  time);
- :func:`loafing_matrix`: smaller architectures run inside larger trained models;
- :func:`destruct`: accuracy drops when deleting or permuting blocks;
- :func:`lesion`: lesion curves (single, worst/best/random k deletions, own and re-estimated
  BN) and residual-branch ratios, of any trained model;
- :func:`kl_drift_summary`: KL(main || sub-network) during training, per epoch;
- :func:`logit_norms`, :func:`effective_receptive_field`: logit amplitude and ERF (ST++);
- :func:`write_report`: a run folder as Markdown and self-contained HTML;
- :func:`select_subnet`: the most accurate sub-network inside a FLOPs, parameter or measured
  latency budget, with its Pareto front (:mod:`nestedtrain.deploy` writes the one chosen);
- :func:`write_latency_kit`: sub-networks as ONNX files with a manifest and a standalone
  ``measure.py`` to time them on the serving device; :func:`read_latency_table` reads the
  table it writes back for :func:`select_subnet`, with its additive predictor.
"""

from .destruct import destroyed_subnets, destruct, swap_subnet
from .erf import effective_receptive_field, erf_area_ratios
from .kl_drift import kl_drift_summary
from .latency import (
    LatencyTable,
    kit_subnets,
    model_identity,
    read_latency_table,
    write_latency_kit,
)
from .lesion import lesion, residual_ratios
from .logits import logit_norms
from .matrix import loafing_matrix
from .report import write_report
from .select import Budget, LatencySpec, pareto_front, pick_best, select_subnet
from .subnets import evaluate_space, match_subnet, subnet_stats

__all__ = [
    "Budget",
    "LatencySpec",
    "LatencyTable",
    "destroyed_subnets",
    "destruct",
    "effective_receptive_field",
    "erf_area_ratios",
    "evaluate_space",
    "kit_subnets",
    "kl_drift_summary",
    "lesion",
    "loafing_matrix",
    "logit_norms",
    "match_subnet",
    "model_identity",
    "pareto_front",
    "pick_best",
    "read_latency_table",
    "residual_ratios",
    "select_subnet",
    "subnet_stats",
    "swap_subnet",
    "write_latency_kit",
    "write_report",
]
