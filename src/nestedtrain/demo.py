"""``nestedtrain demo``: common vs stimulative training on the bundled digits, side by side.

Both runs share every setting but the method; afterwards every ordered sub-network of each is
evaluated (BN re-calibrated), which shows the loafing gap of CT and ST closing it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .engine.config import load_config
from .engine.trainer import train
from .errors import ConfigError

__all__ = ["DEMO_HEADER", "DEMO_OVERRIDES", "run_demo"]

# Measured on this project's 2-core CPU; see README.md for the numbers they gave.
DEMO_MODEL = "resnet32"
DEMO_EPOCHS = 20
DEMO_OVERRIDES = [
    "data.name=digits",
    "batch_size=64",
    "optim.lr=0.1",
    "optim.weight_decay=5e-4",
    "sched.name=cosine",
    "eval.subnets=all",
]


# The columns of the demo's rows (the CLI prints them as a table).
DEMO_HEADER = ("method", "main %", "subnets mean", "subnets min", "subnets", "seconds")


def run_demo(out_dir: Path, epochs: int | None = None, quick: bool = False) -> dict[str, Any]:
    """Train CT and ST with the same settings; return both summaries and their comparison.

    Args:
        out_dir: the demo's folder; its ``ct`` and ``st`` runs are replaced.
        epochs: epochs per method (default ``DEMO_EPOCHS``).
        quick: a seconds-long smoke run (resnet20, 1 epoch, 300 training images).

    Returns:
        ``summaries`` (per method, the trainer's summary), ``title`` (what was run),
        ``header`` (:data:`DEMO_HEADER`) and ``rows`` (per method: main-network accuracy,
        mean and worst sub-network accuracy, sub-networks evaluated, seconds), and ``runs``
        (the two run folders).
    """
    epochs = epochs or (1 if quick else DEMO_EPOCHS)
    if epochs < 1:
        raise ConfigError(f"--epochs {epochs} must be >= 1")
    model = "resnet20" if quick else DEMO_MODEL
    common = [*DEMO_OVERRIDES, f"model.name={model}", f"epochs={epochs}", f"eval.every={epochs}"]
    if quick:
        common += ["data.train_subset=300", "eval.subnets=sample:4"]
    summaries = {}
    for method in ("ct", "st"):
        cfg = load_config(None, [*common, f"method={method}"])
        run = Path(out_dir) / method
        if run.exists():
            shutil.rmtree(run)
        summaries[method] = train(cfg, run)
    return {
        "summaries": summaries,
        "title": f"{model} on digits, {epochs} epochs per method; sub-networks: "
        f"{len(summaries['ct']['subnets'])} ordered ones, BN re-calibrated; top-1 % on test",
        "header": list(DEMO_HEADER),
        "rows": [_row(method, summary) for method, summary in summaries.items()],
        "runs": [str(Path(out_dir) / method) for method in summaries],
    }


def _row(method: str, summary: dict[str, Any]) -> list[Any]:
    accs = [x["acc"] for x in summary["subnets"]]
    return [
        method.upper(),
        summary["main_acc"],
        sum(accs) / len(accs),
        min(accs),
        len(accs),
        round(summary["wall_seconds"]),
    ]
