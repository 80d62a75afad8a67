"""How far sub-networks' outputs drift from the main network's during training (Fig. 7 of ST).

The trainer takes a snapshot every ``analysis.kl_drift_every`` epochs with the engine's
:func:`kl_drift_snapshot` and :func:`append_kl_drift` writes it as one line of
``RUN/analysis/kl_drift.jsonl``:
``{"epoch": e, "kl": [{"subnet": "3-2-4", "kl": 0.12}, ...]}``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..engine.subnet_eval import KL_DRIFT_FILE, append_kl_drift, kl_drift_snapshot
from ..errors import ConfigError
from .subnets import subnet_stats

__all__ = [
    "KL_DRIFT_FILE",
    "append_kl_drift",
    "kl_drift_snapshot",
    "kl_drift_summary",
    "read_kl_drift",
]


def read_kl_drift(run_dir: str | Path) -> list[dict[str, Any]]:
    """The snapshots of a run, by epoch (a resumed run's repeated epochs keep the last one).

    Raises:
        ConfigError: the run recorded none.
    """
    path = Path(run_dir) / KL_DRIFT_FILE
    if not path.is_file():
        raise ConfigError(
            f"{str(path)!r} does not exist: train with analysis.kl_drift_every=E (E >= 1) to "
            "record KL(main || sub-network) every E epochs"
        )
    records: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records[int(record["epoch"])] = record
        except (ValueError, KeyError, TypeError):
            raise ConfigError(
                f"{str(path)!r} line {number} is not a KL snapshot: expected "
                '{"epoch": E, "kl": [{"subnet": S, "kl": V}, ...]}'
            ) from None
    if not records:
        raise ConfigError(f"{str(path)!r} holds no snapshots")
    return [records[e] for e in sorted(records)]


def kl_drift_summary(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per recorded epoch: count, max, mean, std, min and median of the KL values."""
    out = []
    for record in records:
        values = sorted(entry["kl"] for entry in record["kl"])
        n = len(values)
        median = (values[(n - 1) // 2] + values[n // 2]) / 2
        out.append({"epoch": record["epoch"], **subnet_stats(values), "median": median})
    return out
