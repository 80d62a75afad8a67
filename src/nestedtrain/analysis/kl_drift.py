"""How far sub-networks' outputs drift from the main network's during training (Fig. 7 of ST).

The trainer takes a snapshot every ``analysis.kl_drift_every`` epochs
(:func:`nestedtrain.evaluation.kl_drift_snapshot`) and writes it to
``RUN/analysis/kl_drift.jsonl`` (:mod:`nestedtrain.records`); :func:`kl_drift_summary` sums
the snapshots up per epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .subnets import subnet_stats

__all__ = ["kl_drift_summary"]


def kl_drift_summary(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per recorded epoch: count, max, mean, std, min and median of the KL values."""
    out = []
    for record in records:
        values = sorted(entry["kl"] for entry in record["kl"])
        n = len(values)
        median = (values[(n - 1) // 2] + values[n // 2]) / 2
        out.append({"epoch": record["epoch"], **subnet_stats(values), "median": median})
    return out
