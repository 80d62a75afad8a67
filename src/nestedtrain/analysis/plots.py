"""Plots of the analyses, drawn with matplotlib's Agg canvas and saved as PNG.

Figures are built with ``matplotlib.figure.Figure`` and an Agg canvas directly, not through
``pyplot``: no global backend switch, no figure registry to leak, safe in any process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..atomic import atomic_save
from .latency import threads_text

__all__ = [
    "plot_comparison",
    "plot_destruction",
    "plot_erf",
    "plot_kl_drift",
    "plot_lesion",
    "plot_logit_norms",
    "plot_loafing_matrix",
    "plot_pareto",
    "plot_subnet_accuracy",
    "plot_training_curves",
    "save_figure",
]

_DPI = 110


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG (creating its folder) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(figure, path, saver=lambda fig, f: fig.savefig(f, format="png"))
    return path


def plot_subnet_accuracy(result: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Accuracy of each sub-network, fewest blocks first, with individually trained models
    (stars) and the main network with its own BN statistics (dashed line): the papers' Fig. 1/4.
    """
    rows = sorted(result["subnets"], key=lambda r: (r["blocks"], r["subnet"]))
    x = np.arange(len(rows))
    position = {row["subnet"]: i for i, row in enumerate(rows)}
    figure = _figure(max(6.0, min(14.0, 0.25 * len(rows) + 4)), 4.0)
    ax = figure.add_subplot()
    ax.plot(x, [r["acc"] for r in rows], "o-", ms=4, lw=1, label="inside the main network")
    if result.get("individual"):
        ax.plot(
            [position[r["subnet"]] for r in result["individual"]],
            [r["acc"] for r in result["individual"]],
            "*",
            ms=13,
            color="tab:green",
            label="trained individually",
        )
    ax.axhline(result["main"]["acc"], ls="--", color="gray", lw=1, label="main network")
    if len(rows) <= 40:
        ax.set_xticks(x, [r["subnet"] for r in rows], rotation=90, fontsize=7)
    ax.set_xlabel("sub-network (fewest blocks first)")
    ax.set_ylabel("top-1 accuracy (%)")
    stats = result["stats"]
    ax.set_title(
        title
        or f"{stats['count']} sub-networks: mean {stats['mean']:.2f}, "
        f"min {stats['min']:.2f}, max {stats['max']:.2f}, std {stats['std']:.2f}"
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(figure, path)


def plot_loafing_matrix(result: dict[str, Any], path: str | Path) -> Path:
    """Heat map: rows are trained models, columns architectures run inside them."""
    values = np.array(
        [[np.nan if v is None else v for v in row] for row in result["acc"]], dtype=float
    )
    rows, cols = result["models"], result["architectures"]
    figure = _figure(1.2 * len(cols) + 3, 0.8 * len(rows) + 2)
    ax = figure.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("architecture (run inside the trained model)")
    ax.set_ylabel("trained model")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            text = "-" if math.isnan(values[i, j]) else f"{values[i, j]:.1f}"
            color = "white" if not math.isnan(values[i, j]) and values[i, j] < 60 else "black"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=9)
    figure.colorbar(image, ax=ax, label="top-1 accuracy (%)")
    return save_figure(figure, path)


def _boxes(ax, groups: Sequence[dict[str, Any]], what: str) -> None:
    if not groups:
        ax.set_visible(False)
        return
    data = [[row["drop"] for row in group["results"]] for group in groups]
    ax.boxplot(data)
    # tick labels set apart: boxplot's own keyword changed name in matplotlib 3.9
    ax.set_xticks(range(1, len(groups) + 1), [str(group["k"]) for group in groups])
    ax.set_xlabel(what)
    ax.set_ylabel("top-1 drop (points)")
    ax.grid(alpha=0.3)


def plot_destruction(result: dict[str, Any], path: str | Path) -> Path:
    """Fig. 6 of the paper: (a) drop per deleted block, (b) box plots of drops when deleting
    k blocks, (c) when permuting by k transpositions."""
    figure = _figure(14, 4)
    a, b, c = figure.subplots(1, 3)
    single = result["delete_one"]
    a.bar([row["index"] for row in single], [row["drop"] for row in single])
    a.set_xticks([row["index"] for row in single])
    a.tick_params(axis="x", labelsize=7)
    a.set_xlabel("deleted block (index over all blocks)")
    a.set_ylabel("top-1 drop (points)")
    a.set_title("(a) deleting one block")
    a.grid(alpha=0.3)
    _boxes(b, result["delete"], "blocks deleted")
    b.set_title("(b) deleting more blocks")
    _boxes(c, result["permute"], "transpositions")
    c.set_title("(c) permuting blocks")
    figure.suptitle(f"intact {result['intact']['acc']:.2f}%, BN: {result['bn']}")
    return save_figure(figure, path)


_BN_STYLE = {"own": ("tab:blue", "own BN"), "recalibrate": ("tab:orange", "BN re-estimated")}


def plot_lesion(result: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Lesion curves: per stage, the top-1 after deleting each block (one line per BN policy)
    with the block's residual-branch ratio (bars, right axis); last, the top-1 after deleting
    the worst, best and random k blocks."""
    stages = sorted({row["stage"] for row in result["blocks"]})
    figure = _figure(3.6 * (len(stages) + 1), 3.8)
    axes = figure.subplots(1, len(stages) + 1, squeeze=False)[0]
    for ax, stage in zip(axes, stages):
        _lesion_stage(ax, [row for row in result["blocks"] if row["stage"] == stage], result)
    _lesion_curves(axes[-1], result)
    figure.suptitle(title or "lesion: deleting blocks of the trained network")
    return save_figure(figure, path)


def _lesion_stage(ax: Any, rows: list[dict[str, Any]], result: dict[str, Any]) -> None:
    x = [row["block"] for row in rows]
    twin = ax.twinx()
    twin.bar(x, [row["norm_ratio"] for row in rows], color="0.85", zorder=0)
    twin.set_ylabel("||block(x) - x|| / ||x||", color="0.4", fontsize=8)
    ax.set_zorder(twin.get_zorder() + 1)
    ax.patch.set_visible(False)
    for policy in result["bn"]:
        color, label = _BN_STYLE[policy]
        ax.plot(x, [row[policy]["acc"] for row in rows], "o-", color=color, label=label)
        ax.axhline(result["intact"][policy], color=color, linestyle=":", linewidth=1)
    ax.set_xticks(x)
    ax.set_xlabel("deleted block")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"stage {rows[0]['stage']} ({rows[0]['stage_name']})")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)


def _lesion_curves(ax: Any, result: dict[str, Any]) -> None:
    for policy in result["bn"]:
        color, label = _BN_STYLE[policy]
        rows = result["curves"][policy]
        ks = [0, *(row["k"] for row in rows)]
        intact = result["intact"][policy]
        for which, style in (("best", "^-"), ("worst", "v--")):
            accs = [intact, *(r[which]["acc"] for r in rows)]
            ax.plot(ks, accs, style, color=color, label=f"{which} k, {label}")
        if rows and rows[0]["random"] is not None:
            mean = [intact, *(r["random"]["acc_mean"] for r in rows)]
            low = [intact, *(r["random"]["acc_min"] for r in rows)]
            high = [intact, *(r["random"]["acc_max"] for r in rows)]
            ax.plot(ks, mean, ".:", color=color, label=f"random k (mean), {label}")
            ax.fill_between(ks, low, high, color=color, alpha=0.15)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("blocks deleted (k)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("deleting k blocks")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)


def plot_kl_drift(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Fig. 7: box plots, one per recorded epoch, of KL(main || sub) over the sub-networks."""
    figure = _figure(max(6.0, 0.5 * len(records) + 3), 4)
    ax = figure.add_subplot()
    ax.boxplot([[entry["kl"] for entry in record["kl"]] for record in records])
    ax.set_xticks(range(1, len(records) + 1), [str(record["epoch"] + 1) for record in records])
    ax.set_xlabel("epoch")
    ax.set_ylabel("KL(main || sub-network)")
    ax.grid(alpha=0.3)
    return save_figure(figure, path)


def plot_logit_norms(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Fig. 4 of ST++: mean L2 norm of the logits (bars) and top-1 (line) per model."""
    figure = _figure(max(5.0, 1.2 * len(rows) + 2), 4)
    ax = figure.add_subplot()
    x = np.arange(len(rows))
    ax.bar(x, [r["mean_norm"] for r in rows], color="tab:blue", alpha=0.7)
    ax.set_xticks(x, [r["label"] for r in rows], rotation=20, ha="right")
    ax.set_ylabel("mean L2 norm of the logits", color="tab:blue")
    twin = ax.twinx()
    twin.plot(x, [r["acc"] for r in rows], "o-", color="tab:red")
    twin.set_ylabel("top-1 accuracy (%)", color="tab:red")
    return save_figure(figure, path)


def plot_erf(erf: np.ndarray, path: str | Path, title: str = "") -> Path:
    """ERF heat map on a log scale (``log10(1 + x)`` of the contribution scaled to max 1)."""
    scaled = np.log10(1 + erf / max(float(erf.max()), 1e-30) * 1e3) / 3
    figure = _figure(4.5, 4)
    ax = figure.add_subplot()
    image = ax.imshow(scaled, cmap="RdYlGn", vmin=0, vmax=1)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    figure.colorbar(image, ax=ax, label="log-scaled contribution")
    return save_figure(figure, path)


def plot_training_curves(metrics: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Loss terms and accuracies per epoch, from a run's ``metrics.jsonl``."""
    figure = _figure(11, 4)
    left, right = figure.subplots(1, 2)
    epochs = [m["epoch"] + 1 for m in metrics]
    for key in ("loss", "ce", "kl"):
        points = [(e, m[key]) for e, m in zip(epochs, metrics) if m.get(key) is not None]
        if points:
            left.plot(*zip(*points), "-", label=key)
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_xlabel("epoch")
    left.set_ylabel("training loss")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    for key, label in (("test_acc", "test"), ("val_acc", "validation")):
        points = [(e, m[key]) for e, m in zip(epochs, metrics) if m.get(key) is not None]
        if points:
            right.plot(*zip(*points), "o-", ms=3, label=label)
    means = [
        (e, sum(s["acc"] for s in m["subnets"]) / len(m["subnets"]))
        for e, m in zip(epochs, metrics)
        if m.get("subnets")
    ]
    if means:
        right.plot(*zip(*means), "s--", ms=3, label="sub-network mean")
    right.set_xlabel("epoch")
    right.set_ylabel("top-1 accuracy (%)")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    return save_figure(figure, path)


def _pareto_panel(
    ax, result: dict[str, Any], cost: str, scale: float, label: str, limit: float | None
) -> None:
    acc = f"{result['selection_split']}_acc"
    rows = [r for r in result["subnets"] if r.get(cost) is not None and r.get(acc) is not None]
    flag = "on_front" if cost == "flops" else "on_latency_front"
    predicted = [r for r in rows if cost != "flops" and r.get("latency_source") == "predicted"]
    rows = [r for r in rows if r not in predicted]

    def points(chosen: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
        return [r[cost] / scale for r in chosen], [r[acc] for r in chosen]

    measured = f"sub-networks ({len(rows)})" if cost == "flops" else f"measured ({len(rows)})"
    ax.plot(*points(rows), "o", ms=4, color="tab:gray", alpha=0.5, label=measured)
    if predicted:  # hollow: the table's additive model, not a measurement
        hollow = {"mfc": "none", "color": "tab:gray", "alpha": 0.6}
        ax.plot(*points(predicted), "o", ms=4, **hollow, label=f"predicted ({len(predicted)})")
    front = sorted((r for r in rows if r.get(flag)), key=lambda r: r[cost])
    ax.plot(
        *points(front),
        "o-",
        ms=5,
        lw=1.5,
        color="tab:blue",
        label="Pareto front",
        drawstyle="steps-post",
    )
    main, pick = result["main"], result["pick"]
    if main.get(cost) is not None:
        ax.plot(main[cost] / scale, main[acc], "D", ms=8, color="black", label="main network")
    if pick.get(cost) is not None:
        ax.plot(
            pick[cost] / scale,
            pick[acc],
            "*",
            ms=16,
            color="tab:red",
            label=f"pick {pick['subnet']}",
        )
    if limit is not None:
        ax.axvline(limit, ls="--", lw=1, color="tab:red", alpha=0.6, label="budget")
    ax.set_xlabel(label)
    ax.set_ylabel(f"top-1 on {result['selection_split']} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def plot_pareto(result: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Selection accuracy against FLOPs (and measured latency, when there is any): every
    sub-network a point, the Pareto front a line, the pick a star, the main network a
    diamond, the budget a dashed line."""
    timed = any(r.get("latency_ms") is not None for r in result["subnets"])
    figure = _figure(11 if timed else 6.5, 4.5)
    axes = figure.subplots(1, 2) if timed else [figure.add_subplot()]
    budget = result.get("budget") or {}
    _pareto_panel(
        axes[0], result, "flops", 1e6, "forward MFLOPs per image", budget.get("max_mflops")
    )
    if timed:
        _pareto_panel(
            axes[1],
            result,
            "latency_ms",
            1.0,
            _latency_axis(result.get("latency") or {}),
            budget.get("max_latency_ms"),
        )
    figure.suptitle(title or f"pick {result['pick']['subnet']} for budget: {_budget_text(budget)}")
    return save_figure(figure, path)


def _latency_axis(spec: dict[str, Any]) -> str:
    """The latency panel's axis label: measured here, or on the device of a latency table."""
    if spec.get("source") == "table":
        machine = spec["machine"]
        return (
            f"device latency, ms (median; onnxruntime {machine['onnxruntime']}, "
            f"{threads_text(machine['threads'])}, batch {spec['batch']};\n{machine['cpu']})"
        )
    where = f"{spec.get('device', '?')}, batch {spec.get('batch', '?')}, "
    where += f"{spec.get('threads', '?')} thread(s)"
    return f"measured latency, ms (median; {where})"


def _budget_text(budget: dict[str, Any]) -> str:
    units = {"max_mflops": "MFLOPs", "max_params_m": "M params", "max_latency_ms": "ms"}
    parts = [f"<= {budget[k]:g} {unit}" for k, unit in units.items() if budget.get(k) is not None]
    return ", ".join(parts) or "none"


def _group_name(label: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in label.items()) or "all runs"


def plot_comparison(result: dict[str, Any], folder: str | Path) -> list[Path]:
    """Three figures of a comparison (``nestedtrain compare``), written into ``folder``:
    accuracy per epoch on the compared split (mean line, ± std band) per group, the spread of sub-network
    accuracies per group (when evaluated), and accuracy against training time."""
    folder = Path(folder)
    groups = result["groups"]
    paths = []
    figure = _figure(7.0, 4.2)
    ax = figure.add_subplot()
    for group in groups:
        curve = group["curve"]
        if not curve["epoch"]:
            continue
        epochs = np.asarray(curve["epoch"]) + 1
        mean, std = np.asarray(curve["mean"]), np.asarray(curve["std"])
        (line,) = ax.plot(
            epochs, mean, lw=1.5, label=f"{_group_name(group['label'])} (n={group['n']})"
        )
        ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("epoch")
    split = result.get("split", "test")
    ax.set_ylabel(f"{split} top-1 (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.lines:  # runs evaluated on this split at the same epochs
        ax.legend(fontsize=7)
    ax.set_title(f"{split} accuracy per epoch: mean over seeds, ± std")
    paths.append(save_figure(figure, folder / "accuracy_per_epoch.png"))

    with_subnets = [g for g in groups if g.get("subnet_accs")]
    if with_subnets:
        figure = _figure(max(5.0, 1.2 * len(with_subnets) + 3), 4.2)
        ax = figure.add_subplot()
        ax.boxplot([g["subnet_accs"] for g in with_subnets], showmeans=True)
        ax.set_xticks(range(1, len(with_subnets) + 1))
        ax.set_xticklabels([_group_name(g["label"]) for g in with_subnets], rotation=20, fontsize=7)
        ax.set_ylabel("sub-network test top-1 (%)")
        ax.set_title("sub-network accuracies, all seeds")
        paths.append(save_figure(figure, folder / "subnet_accuracy.png"))

    figure = _figure(6.0, 4.2)
    ax = figure.add_subplot()
    for group in groups:
        acc, wall = group["main_acc"], group["wall_seconds"]
        if acc["mean"] is None or wall["mean"] is None:
            continue
        ax.errorbar(
            wall["mean"],
            acc["mean"],
            xerr=wall["std"] or 0.0,
            yerr=acc["std"] or 0.0,
            fmt="o",
            capsize=3,
            label=_group_name(group["label"]),
        )
    ax.set_xlabel("training wall time (s), mean over seeds")
    ax.set_ylabel(f"{split} top-1 (%)")
    ax.legend(fontsize=7)
    ax.set_title("accuracy against training cost")
    paths.append(save_figure(figure, folder / "accuracy_vs_cost.png"))
    return paths
