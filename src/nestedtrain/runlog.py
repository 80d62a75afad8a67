"""A run folder's JSON-lines logs, read in one place.

``metrics.jsonl`` holds one JSON object per line, one line per finished epoch; the trainer
appends them, and motivation conditions (replaying an earlier run), the engine and the analyses
read them back with :func:`read_metrics`. The lowest layer: plain Python, no other module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["METRICS_FILE", "read_metrics"]

METRICS_FILE = "metrics.jsonl"


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
