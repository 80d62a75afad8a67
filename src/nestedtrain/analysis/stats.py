"""Mean ± sample standard deviation over runs, and its text: the statistic comparisons report.

Standard deviations are sample standard deviations (n - 1); with one run there is none.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any

__all__ = ["format_mean_std", "mean_std"]


def mean_std(values: Iterable[float | None]) -> dict[str, Any]:
    """``{"mean", "std", "n"}`` of the values that are not None (``std`` None for one)."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(present) if len(present) > 1 else None
    return {"mean": statistics.fmean(present), "std": std, "n": len(present)}


def format_mean_std(stat: dict[str, Any] | None, digits: int = 2) -> str:
    """``mean ± std`` (or the mean alone for one run, ``-`` for none)."""
    if not stat or stat.get("mean") is None:
        return "-"
    mean = f"{stat['mean']:.{digits}f}"
    return mean if stat.get("std") is None else f"{mean} ± {stat['std']:.{digits}f}"
