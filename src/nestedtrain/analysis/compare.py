"""Compare finished runs: group them by setting, mean ± std over seeds, paired differences.

:func:`compare_runs` reads run folders (``config.yaml``, ``summary.json``, ``metrics.jsonl``),
groups them by the fields that tell the settings apart (by default every override of the
sweep that differs between runs, except ``seed``; for runs from no sweep, every recipe field
that differs), and summarises each group over its seeds. A baseline group gives paired
differences: run of seed s minus the baseline's run of seed s, mean ± std over the seeds both
have. Motivation groups get the Motivation paper's efficiency metrics against the classical
(``method=ct``) groups of their base and motivated models in the same comparison.

Standard deviations are sample standard deviations (n - 1); with one run there is none.

``split="val"`` compares the main network's accuracy on the held-out validation split (the
run's last evaluation) and leaves out everything measured on the test split: choose settings
that way, then read the test split once for the settings chosen.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ..engine.sweep import read_sweep
from ..errors import ConfigError
from ..records import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, read_metrics, read_summary
from .motivation import efficiency_metrics
from .stats import format_mean_std, mean_std

__all__ = [
    "compare_rows",
    "compare_runs",
    "find_runs",
    "parse_baseline",
    "write_comparison",
]

# Fields that must agree inside a group: a mean over different data or schedules means nothing.
_MUST_AGREE = ("data.name", "data.train_subset", "epochs")
# The splits a comparison can read the main network's accuracy from.
SPLITS = ("test", "val")
# Fields that differ between runs without making them different settings.
_NOT_SETTINGS = ("seed", "data.root", "device")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def _value_text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


class _Run:
    """One finished run folder, read once."""

    def __init__(self, folder: Path, overrides: dict[str, str] | None):
        self.folder = folder
        self.config = _flatten(OmegaConf.to_container(OmegaConf.load(folder / CONFIG_FILE)))
        self.summary = read_summary(folder)
        metrics = folder / METRICS_FILE
        self.metrics = read_metrics(metrics) if metrics.is_file() else []
        self.overrides = overrides  # from the sweep that made it, if any

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    def main_acc(self, split: str) -> float | None:
        """The main network's accuracy at the run's last evaluation on ``split``."""
        if split == "test":
            return self.summary.get("main_acc")
        if "val_acc" in self.summary:
            return self.summary["val_acc"]
        # runs written before summary.json held val_acc: their last logged evaluation
        evaluated = [m["val_acc"] for m in self.metrics if m.get("val_acc") is not None]
        return evaluated[-1] if evaluated else None

    def field(self, key: str) -> str:
        if key not in self.config:
            raise ConfigError(
                f"--by {key}: no such recipe field in {self.folder}/config.yaml (fields look "
                "like method, model.name, st.lam)"
            )
        return _value_text(self.config[key])


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run folders named, or the finished run folders directly inside the folders named.

    Raises:
        ConfigError: a path that is neither, or no finished run at all.
    """
    runs: list[Path] = []
    for path in map(Path, paths):
        if (path / SUMMARY_FILE).is_file() and (path / CONFIG_FILE).is_file():
            runs.append(path)
        elif path.is_dir():
            inside = sorted(
                p for p in path.iterdir() if (p / SUMMARY_FILE).is_file() and p.is_dir()
            )
            if not inside and not any((p / CONFIG_FILE).is_file() for p in path.iterdir()):
                raise ConfigError(
                    f"{str(path)!r} is no run folder and holds none: give finished run folders "
                    "or the --out of a sweep"
                )
            runs.extend(inside)
        else:
            raise ConfigError(f"{str(path)!r} does not exist: give run folders or a sweep folder")
    if not runs:
        raise ConfigError("no finished runs (with summary.json) to compare")
    return runs


def parse_baseline(text: str | None) -> dict[str, str]:
    """``method=ct,model.name=resnet20`` -> ``{"method": "ct", "model.name": "resnet20"}``."""
    if not text:
        return {}
    pairs = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"--baseline {text!r}: write key=value[,key=value], e.g. method=ct")
        pairs[key.strip()] = value.strip()
    return pairs


def _group_keys(runs: Sequence[_Run]) -> list[str]:
    """The fields that tell the runs' settings apart, in a stable order."""
    if all(run.overrides is not None for run in runs):
        # a field one run overrides and another does not still tells them apart
        keys = list(dict.fromkeys(k for run in runs for k in run.overrides))
    else:
        keys = sorted({k for run in runs for k in run.config})
    return [
        key
        for key in keys
        if key not in _NOT_SETTINGS and len({_value_text(run.config.get(key)) for run in runs}) > 1
    ]


def _images_per_second(run: _Run) -> float | None:
    rates = [m["images_per_second"] for m in run.metrics if "images_per_second" in m]
    return statistics.median(rates) if rates else None


def _training_cost(run: _Run) -> float | None:
    """Seconds of training per training image of an epoch: epochs ÷ median images/s. Per-step
    cost × epochs, comparable between runs of one data size (and one machine)."""
    rate, epochs = _images_per_second(run), run.config.get("epochs")
    return epochs / rate if rate and isinstance(epochs, int) else None


def _relative_costs(groups: list[dict[str, Any]], runs: dict[tuple, list[_Run]], base: tuple):
    """Each group's ``relative_cost``: its mean training cost over the baseline's, where both
    train on the same data and number of images (else None)."""
    same = ("data.name", "data.train_subset")
    base_data = [runs[base][0].config.get(f) for f in same]
    base_cost = next(g for g, label in zip(groups, runs) if label == base)["train_cost"]["mean"]
    for group, label in zip(groups, runs):
        cost = group["train_cost"]["mean"]
        data = [runs[label][0].config.get(f) for f in same]
        fits = data == base_data and cost is not None and base_cost
        group["relative_cost"] = cost / base_cost if fits else None


def _group_stats(runs: Sequence[_Run], split: str) -> dict[str, Any]:
    summaries = [run.summary for run in runs]

    def column(key: str) -> list[Any]:
        return [s.get(key) for s in summaries]

    stats = {
        "n": len(runs),
        "seeds": [run.seed for run in runs],
        "runs": [str(run.folder) for run in runs],
        "main_acc": mean_std([run.main_acc(split) for run in runs]),
        "best_epoch": mean_std(column("best_epoch")),
        "wall_seconds": mean_std(column("wall_seconds")),
        "images_per_second": mean_std([_images_per_second(run) for run in runs]),
        "train_cost": mean_std([_training_cost(run) for run in runs]),
        "flops": mean_std(column("flops")),
    }
    if split != "test":
        return stats  # sub-networks and the motivation models are measured on test only
    if any(s.get("subnets") for s in summaries):
        stats["subnet_acc_mean"] = mean_std(column("subnet_acc_mean"))
        minima = [m for m in column("subnet_acc_min") if m is not None]
        stats["subnet_acc_min"] = min(minima) if minima else None
        stats["subnet_accs"] = [sub["acc"] for s in summaries for sub in s.get("subnets", [])]
        stats["subnet_count"] = max(len(s.get("subnets", [])) for s in summaries)
    if all(run.config.get("method") == "motivation" for run in runs):
        stats["base_acc"] = mean_std(column("base_acc"))
        stats["motivated_acc"] = mean_std(column("motivated_acc"))
        stats["motivated_acc_raw"] = mean_std(column("motivated_acc_raw"))
        stats["flops_per_image"] = mean_std(column("flops_per_image"))
    return stats


def _paired(
    group: Sequence[_Run], baseline: Sequence[_Run], value: Callable[[_Run], float | None]
) -> dict[str, Any] | None:
    base_by_seed = {run.seed: value(run) for run in baseline}
    diffs = [
        value(run) - base_by_seed[run.seed]
        for run in group
        if value(run) is not None and base_by_seed.get(run.seed) is not None
    ]
    return mean_std(diffs) if diffs else None


def _motivation_efficiency(
    runs: Sequence[_Run], groups: dict[tuple, list[_Run]]
) -> dict[str, Any] | None:
    """ACC/FLOPs and ACC/F_Ratio of a motivation group against the classical groups of its
    base (X) and motivated (Y) models, when the comparison holds them."""
    first = runs[0].config
    base, motivated = first.get("model.name"), first.get("motivation.model")

    def classical(model: str) -> list[_Run]:
        found = []
        for members in groups.values():
            c = members[0].config
            if c.get("method") == "ct" and c.get("model.name") == model:
                if all(c.get(k) == first.get(k) for k in _MUST_AGREE):
                    found.extend(members)
        return found

    x, y = classical(base), classical(motivated)
    if not x or not y:
        return None
    read = {
        role: [(run.summary, run.folder / SUMMARY_FILE) for run in members]
        for role, members in (("run", runs), ("base-classical", x), ("motivated-classical", y))
    }
    try:
        found = efficiency_metrics(read)
    except ValueError:  # a value missing, or a metric undefined: no efficiency for this group
        return None
    return {
        "base_model": base,
        "motivated_model": motivated,
        **{name: found[name]["mean"] for name in ("acc_xc", "acc_yc", "flops_xc", "flops_yc")},
        **{name: found[name] for name in ("acc_flops_xyb", "acc_flops_yc", "ratio")},
    }


def compare_runs(
    paths: Sequence[str | Path],
    by: Sequence[str] | None = None,
    baseline: dict[str, str] | None = None,
    split: str = "test",
) -> dict[str, Any]:
    """Group finished runs and summarise each group over its seeds.

    Args:
        paths: run folders, or folders holding them (a sweep's ``--out``).
        by: the recipe fields to group by (default: see the module docstring).
        baseline: ``{field: value}`` picking the baseline group for paired differences.
        split: ``test``, or ``val``: the main network's validation accuracy only (runs
            without a validation split have none).

    Returns:
        ``{"by": [...], "groups": [{"label": {field: value}, ...stats}], "baseline": ...}``.

    Raises:
        ConfigError: no runs, an unknown field, runs of different data or epochs in one group,
            a baseline that matches no group or several, an unknown split.
    """
    if split not in SPLITS:
        raise ConfigError(f"split {split!r} must be one of {', '.join(SPLITS)}")
    runs = _read_runs(find_runs(paths))
    keys = list(by) if by else _group_keys(runs)
    groups = _group_runs(runs, keys)
    baseline_label = _find_baseline(groups, keys, baseline or {})
    result_groups = []
    for label, members in groups.items():
        members.sort(key=lambda run: str(run.seed))
        stats = {"label": dict(zip(keys, label)), **_group_stats(members, split)}
        if baseline_label is not None and label != baseline_label:
            base = groups[baseline_label]
            stats.update(_paired_stats(members, base, split, "subnet_acc_mean" in stats))
        if split == "test" and members[0].config.get("method") == "motivation":
            stats["efficiency"] = _motivation_efficiency(members, groups)
        stats["curve"] = _accuracy_curve(members, f"{split}_acc")
        result_groups.append(stats)
    if baseline_label is not None:
        _relative_costs(result_groups, groups, baseline_label)
    return {
        "by": keys,
        "split": split,
        "groups": result_groups,
        "baseline": dict(zip(keys, baseline_label)) if baseline_label is not None else None,
    }


def _read_runs(folders: Sequence[Path]) -> list[_Run]:
    """Each run folder read once, with the overrides of the sweep that made it, if any."""
    sweeps: dict[Path, dict[str, Any]] = {}
    runs = []
    for folder in folders:
        parent = folder.parent
        if parent not in sweeps:
            sweeps[parent] = read_sweep(parent)
        entry = sweeps[parent].get(folder.name)
        overrides = None
        if entry is not None:
            overrides = dict(item.split("=", 1) for item in entry["overrides"])
        runs.append(_Run(folder, overrides))
    return runs


def _group_runs(runs: Sequence[_Run], keys: list[str]) -> dict[tuple, list[_Run]]:
    """The runs grouped by their values of ``keys``.

    Raises:
        ConfigError: a group mixes runs whose ``_MUST_AGREE`` fields differ.
    """
    groups: dict[tuple, list[_Run]] = {}
    for run in runs:
        groups.setdefault(tuple(run.field(k) for k in keys), []).append(run)
    for label, members in groups.items():
        for field in _MUST_AGREE:
            values = {_value_text(run.config.get(field)) for run in members}
            if len(values) > 1:
                named = ", ".join(f"{k}={v}" for k, v in zip(keys, label)) or "all runs"
                raise ConfigError(
                    f"group {named} mixes runs with different {field} ({', '.join(sorted(values))}):"
                    f" add {field} to --by"
                )
    return groups


def _paired_stats(
    members: Sequence[_Run], base: Sequence[_Run], split: str, subnets: bool
) -> dict[str, Any]:
    """Paired differences of a group to the baseline group, seed by seed (and of the
    sub-networks' mean accuracy when ``subnets``)."""
    paired = {"paired_main_acc": _paired(members, base, lambda run: run.main_acc(split))}
    if subnets:
        paired["paired_subnet_acc_mean"] = _paired(
            members, base, lambda run: run.summary.get("subnet_acc_mean")
        )
    return paired


def _find_baseline(
    groups: dict[tuple, list[_Run]], keys: list[str], wanted: dict[str, str]
) -> tuple | None:
    if not wanted:
        return None
    matches = [
        label
        for label, members in groups.items()
        if all(members[0].field(k) == v for k, v in wanted.items())
    ]
    text = ",".join(f"{k}={v}" for k, v in wanted.items())
    if not matches:
        raise ConfigError(f"--baseline {text} matches no group of runs")
    if len(matches) > 1:
        raise ConfigError(
            f"--baseline {text} matches {len(matches)} groups: name more fields, e.g. "
            + ",".join(f"{k}={v}" for k, v in zip(keys, matches[0]))
        )
    return matches[0]


def _accuracy_curve(runs: Sequence[_Run], key: str) -> dict[str, list]:
    """Per epoch with an accuracy ``key`` in every run: mean and std over the runs."""
    per_epoch: dict[int, list[float]] = {}
    for run in runs:
        for m in run.metrics:
            if m.get(key) is not None:
                per_epoch.setdefault(m["epoch"], []).append(m[key])
    epochs = [e for e in sorted(per_epoch) if len(per_epoch[e]) == len(runs)]
    stats = [mean_std(per_epoch[e]) for e in epochs]
    return {
        "epoch": epochs,
        "mean": [s["mean"] for s in stats],
        "std": [s["std"] or 0.0 for s in stats],
    }


def _number(value: Any, digits: int = 1) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}"


def compare_rows(result: dict[str, Any]) -> list[tuple[list[str], list[list[str]]]]:
    """The comparison as tables of text cells: ``[(header, rows)]``, the main table first,
    then the motivation table when a group is a motivation run."""
    keys = result["by"]
    paired = result["baseline"] is not None
    subnets = any("subnet_acc_mean" in g for g in result["groups"])
    header = [*keys, "n", "main %" if result.get("split", "test") == "test" else "main val %"]
    header += ["Δ main vs baseline"] if paired else []
    header += ["subnets mean %", "subnets min %"] if subnets else []
    header += ["Δ subnets vs baseline"] if paired and subnets else []
    header += ["best epoch", "wall s", "images/s", "MFLOPs/image"]
    # training cost (epochs ÷ images/s) relative to the baseline's: CT at equal compute trains
    # for as many epochs as this factor buys
    header += ["cost × baseline"] if paired else []
    rows = []
    for group in result["groups"]:
        is_baseline = paired and group["label"] == result["baseline"]
        row = [group["label"][k] for k in keys] + [str(group["n"])]
        row.append(format_mean_std(group["main_acc"]))
        if paired:
            row.append("baseline" if is_baseline else format_mean_std(group.get("paired_main_acc")))
        if subnets:
            row.append(format_mean_std(group.get("subnet_acc_mean")))
            row.append(_number(group.get("subnet_acc_min"), 2))
        if paired and subnets:
            paired_subnets = format_mean_std(group.get("paired_subnet_acc_mean"))
            row.append("baseline" if is_baseline else paired_subnets)
        row.append(_number(group["best_epoch"]["mean"]))
        row.append(_number(group["wall_seconds"]["mean"], 0))
        row.append(_number(group["images_per_second"]["mean"], 0))
        flops = group.get("flops_per_image") or group["flops"]
        row.append(_number(flops["mean"] / 1e6 if flops["mean"] is not None else None, 2))
        if paired:
            row.append(_number(group.get("relative_cost"), 2))
        rows.append(row)
    tables = [(header, rows)]
    motivation = [g for g in result["groups"] if "base_acc" in g]
    if motivation:
        tables.append(_motivation_table(keys, motivation))
    return tables


def _motivation_table(keys: list[str], groups: list[dict[str, Any]]):
    """The motivation groups' two models and the paper's efficiency metrics, as text cells."""
    header = [*keys, "base %", "motivated %", "motivated % (base's BN)", "F_X-Y MFLOPs"]
    header += ["X classical %", "Y classical %", "ACC/FLOPs X-Y-B (pp/MFLOP)"]
    header += ["ACC/FLOPs Y-C (pp/MFLOP)", "ACC/F ratio"]
    rows = []
    for group in groups:
        eff = group.get("efficiency") or {}
        flops = group["flops_per_image"]["mean"]
        rows.append(
            [group["label"][k] for k in keys]
            + [
                format_mean_std(group["base_acc"]),
                format_mean_std(group["motivated_acc"]),
                format_mean_std(group["motivated_acc_raw"]),
                _number(flops / 1e6 if flops is not None else None, 2),
                _number(eff.get("acc_xc"), 2),
                _number(eff.get("acc_yc"), 2),
                # percentage points per MFLOP (the paper's Table 1 shows 100x these)
                _number(_per_mflop(eff.get("acc_flops_xyb")), 4),
                _number(_per_mflop(eff.get("acc_flops_yc")), 4),
                _number(eff.get("ratio"), 3),
            ]
        )
    return header, rows


def _per_mflop(value: float | None) -> float | None:
    return None if value is None else value * 1e6


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_comparison(result: dict[str, Any], out_dir: str | Path, command: str) -> list[Path]:
    """``compare.json``, ``compare.md`` and the plots into ``out_dir``; returns the files."""
    from ..atomic import atomic_write_text
    from .plots import plot_comparison

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = plot_comparison(result, out_dir)
    parts = [f"# Comparison\n\n`{command}`\n"]
    parts.append(
        "Mean ± sample standard deviation over each group's runs (seeds); Δ is the paired "
        "difference to the baseline's run of the same seed, mean ± std over the seeds both have."
    )
    for header, rows in compare_rows(result):
        parts.append(_markdown_table(header, rows))
    parts += [f"![{image.stem}]({image.name})" for image in images]
    markdown = out_dir / "compare.md"
    atomic_write_text(markdown, "\n\n".join(parts) + "\n")
    data = out_dir / "compare.json"
    atomic_write_text(data, json.dumps({"command": command, **result}, indent=2) + "\n")
    return [markdown, data, *images]
