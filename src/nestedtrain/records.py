"""A run's record files: their names, formats, and the one reader and writer of each.

Each is written atomically (:mod:`nestedtrain.atomic`). The lowest layer: no other
nestedtrain module but :mod:`nestedtrain.errors` and :mod:`nestedtrain.atomic`.

- ``config.yaml``: the resolved recipe, written by the trainer.
- ``metrics.jsonl``: one JSON object per finished epoch (:func:`append_metrics`,
  :func:`read_metrics`).
- ``analysis/kl_drift.jsonl``: KL(main || sub-network) snapshots,
  ``{"epoch": e, "kl": [{"subnet": "3-2-4", "kl": 0.12}, ...]}`` (:func:`append_kl_drift`,
  :func:`read_kl_drift`).
- ``summary.json``: the finished run (:func:`write_summary`, :func:`read_summary`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .atomic import atomic_append_line, atomic_write_text
from .errors import ConfigError

__all__ = [
    "CONFIG_FILE",
    "KL_DRIFT_FILE",
    "METRICS_FILE",
    "SUMMARY_FILE",
    "append_kl_drift",
    "append_metrics",
    "read_kl_drift",
    "read_metrics",
    "read_summary",
    "truncate_logs",
    "write_summary",
]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
KL_DRIFT_FILE = str(Path("analysis") / "kl_drift.jsonl")
SUMMARY_FILE = "summary.json"


# ------------------------------------------------------------------------ metrics.jsonl
def append_metrics(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Add one epoch's record to ``RUN/metrics.jsonl``."""
    atomic_append_line(Path(run_dir) / METRICS_FILE, json.dumps(record))


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines log such as ``RUN/metrics.jsonl``, in file order.

    Blank lines are skipped. A resumed run may log an epoch twice; the caller decides which
    line wins.

    Raises:
        ConfigError: the file does not exist, or a line is not a JSON object (named by number).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{str(path)!r} does not exist: give the {METRICS_FILE} of a nestedtrain run folder"
        )
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ConfigError(f"{str(path)!r} line {number} is not JSON") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{str(path)!r} line {number} is not a JSON object")
        records.append(record)
    return records


def truncate_logs(run_dir: str | Path, before_epoch: int) -> None:
    """Keep the lines of the run's per-epoch logs whose ``epoch`` is below ``before_epoch``
    (a resumed run drops what was logged after its checkpoint)."""
    for name in (METRICS_FILE, KL_DRIFT_FILE):
        path = Path(run_dir) / name
        if path.exists():
            records = [r for r in read_metrics(path) if r["epoch"] < before_epoch]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


# ------------------------------------------------------------------- kl_drift.jsonl
def append_kl_drift(run_dir: str | Path, epoch: int, snapshot: dict[str, float]) -> Path:
    """Append one snapshot (sub-network name -> KL) as a line of ``RUN/analysis/kl_drift.jsonl``;
    returns the file."""
    path = Path(run_dir) / KL_DRIFT_FILE
    record = {"epoch": int(epoch), "kl": [{"subnet": s, "kl": v} for s, v in snapshot.items()]}
    atomic_append_line(path, json.dumps(record))
    return path


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


# ---------------------------------------------------------------------- summary.json
def write_summary(run_dir: str | Path, summary: dict[str, Any]) -> None:
    """Write ``RUN/summary.json`` (the mark of a finished run)."""
    atomic_write_text(Path(run_dir) / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")


def read_summary(path: str | Path) -> dict[str, Any]:
    """A finished run's summary, from its folder or its ``summary.json``.

    Raises:
        ConfigError: no summary there, or not a JSON object.
    """
    path = Path(path)
    file = path / SUMMARY_FILE if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(
            f"{str(path)!r} has no {SUMMARY_FILE}: give a finished run folder or its {SUMMARY_FILE}"
        )
    try:
        summary = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read {str(file)!r}: {err}") from None
    if not isinstance(summary, dict):
        raise ConfigError(f"{str(file)!r} holds no JSON object: give a run's {SUMMARY_FILE}")
    return summary
