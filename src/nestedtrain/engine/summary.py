"""A finished run's ``summary.json``: what it reached and what it cost."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..data import Data
from ..flops import count_flops, count_params
from ..methods import MethodStep

__all__ = ["run_summary"]


def run_summary(
    cfg: Any,
    model: nn.Module,
    method: MethodStep,
    data: Data,
    last: dict[str, Any],
    best: dict[str, Any],
    wall_seconds: float,
) -> dict[str, Any]:
    """The summary of a run whose last log record is ``last``: accuracies (main, EMA, the
    method's other models, evaluated sub-networks), FLOPs and parameters, wall time."""
    side = data.test_img_size
    subnets = [
        {
            "subnet": r["subnet"],
            "acc": r["acc"],
            "flops": count_flops(model, side, data.in_chans, subnet=r["subnet"]),
            "params": count_params(model, subnet=r["subnet"]),
        }
        for r in last.get("subnets", [])
    ]
    summary = {
        "method": cfg.method,
        "model": cfg.model.name,
        "dataset": cfg.data.name,
        "epochs": cfg.epochs,
        "main_acc": last.get("test_acc"),
        "main_acc5": last.get("test_acc5"),
        "val_acc": last.get("val_acc"),
        "best_epoch": best["epoch"],
        "best_val_acc": best["val_acc"],
        "best_epoch_test_acc": best.get("test_acc"),
        "flops": count_flops(model, side, data.in_chans),
        "params": count_params(model),
        "wall_seconds": wall_seconds,
        "subnets": subnets,
        **data.bad_images.summary(),
    }
    if subnets:
        accs = [s["acc"] for s in subnets]
        summary["subnet_acc_mean"] = sum(accs) / len(accs)
        summary["subnet_acc_min"] = min(accs)
    if cfg.ema:
        summary["ema_test_acc"] = last.get("ema_test_acc")
    for name, other in method.extra_models().items():
        summary[f"{name}_acc"] = last.get(f"{name}_acc")
        if f"{name}_acc_raw" in last:
            summary[f"{name}_acc_raw"] = last[f"{name}_acc_raw"]
        same = other is model
        summary[f"flops_{name}"] = (
            summary["flops"] if same else count_flops(other, side, data.in_chans)
        )
    summary.update(method.summary_extras(summary))
    return summary
