"""A run folder as one Markdown file and one self-contained HTML page.

``write_report(RUN)`` reads ``config.yaml``, ``metrics.jsonl``, ``summary.json``,
``analysis/kl_drift.jsonl`` and every analysis in ``analysis/<what>/`` (its JSON and the PNG
of the same name), and writes ``RUN/report.md`` (images linked) and ``RUN/report.html``
(images embedded as base64 data URIs, so the page is one file to mail or archive). Every
number is shown under the command that produced it.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from ..errors import ConfigError
from ..records import (
    CONFIG_FILE,
    KL_DRIFT_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    read_kl_drift,
    read_metrics,
)
from .kl_drift import kl_drift_summary
from .latency import describe_latency, describe_predictor
from .plots import plot_kl_drift, plot_training_curves

__all__ = ["write_report"]

# Training plots drawn for the report go here, next to report.md.
REPORT_FILES = "report_files"


@dataclass
class _Section:
    title: str
    command: str | None = None
    notes: list[str] = field(default_factory=list)
    tables: list[tuple[str, list[str], list[list[Any]]]] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    code: str | None = None

    def table(self, caption: str, headers: Sequence[str], rows: list[list[Any]]) -> None:
        self.tables.append((caption, list(headers), rows))

    def records(
        self, caption: str, records: Sequence[dict[str, Any]] | None, columns: Mapping[str, str]
    ) -> None:
        """A table of ``records`` with a column per ``header: key``; none without records."""
        if records:
            self.table(caption, list(columns), _fields(records, *columns.values()))


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 0.1 or value == 0 else f"{value:.3g}"
    if isinstance(value, int) and abs(value) >= 10**6:
        return f"{value / 1e6:.2f}M"
    return str(value)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read {str(path)!r}: {err}") from None


# ------------------------------------------------------------------------ sections
def _training(run: Path, out: Path) -> list[_Section]:
    sections = []
    metrics_path, summary_path = run / METRICS_FILE, run / SUMMARY_FILE
    origin = "nestedtrain train (recipe: config.yaml of this run)"
    if summary_path.is_file():
        summary = _read_json(summary_path)
        section = _Section("Result", command=summary.get("command", origin))
        keys = [
            "method",
            "model",
            "dataset",
            "epochs",
            "main_acc",
            "main_acc5",
            "best_epoch",
            "best_val_acc",
            "best_epoch_test_acc",
            "subnet_acc_mean",
            "subnet_acc_min",
            "ema_test_acc",
            "flops",
            "params",
            "wall_seconds",
        ]
        rows = [[key, summary[key]] for key in keys if key in summary]
        section.table("", ["", "value"], rows)
        if summary.get("subnets"):
            section.table(
                "Sub-networks evaluated after the last epoch (BN re-calibrated)",
                ["sub-network", "top-1 (%)", "FLOPs", "params"],
                [
                    [s["subnet"], s["acc"], s.get("flops"), s.get("params")]
                    for s in summary["subnets"]
                ],
            )
        sections.append(section)
    if metrics_path.is_file():
        metrics = read_metrics(metrics_path)
        if metrics:
            section = _Section("Training curves", command=origin)
            section.images.append(plot_training_curves(metrics, out / "training.png"))
            last = metrics[-1]
            keys = ["epoch", "lr", "loss", "ce", "kl", "val_acc", "test_acc", "test_acc5"]
            keys += ["epoch_seconds", "images_per_second"]
            section.table(
                "Last epoch",
                ["", "value"],
                [[key, last[key]] for key in keys if last.get(key) is not None],
            )
            sections.append(section)
    return sections


def _kl_from_training(run: Path, out: Path) -> _Section | None:
    if not (run / KL_DRIFT_FILE).is_file():
        return None
    records = read_kl_drift(run)
    section = _Section(
        "KL(main || sub-network) during training",
        command="nestedtrain train with analysis.kl_drift_every (analysis/kl_drift.jsonl)",
    )
    section.images.append(plot_kl_drift(records, out / "kl_drift.png"))
    section.table(*_kl_table(kl_drift_summary(records)))
    return section


def _kl_table(summary: Sequence[dict[str, Any]]) -> tuple[str, list[str], list[list[Any]]]:
    return (
        "",
        ["epoch", "sub-networks", "min", "median", "mean", "max"],
        [[s["epoch"] + 1, s["count"], s["min"], s["median"], s["mean"], s["max"]] for s in summary],
    )


def _fields(records: Sequence[dict[str, Any]], *keys: str) -> list[list[Any]]:
    """Table rows: the values of ``keys`` in each record."""
    return [[record[key] for key in keys] for record in records]


def _stats_row(stats: dict[str, Any]) -> list[Any]:
    return [stats["count"], stats["max"], stats["mean"], stats["std"], stats["min"]]


_STATS_HEADERS = ["count", "max", "mean", "std", "min"]


def _analysis_section(path: Path, data: dict[str, Any]) -> _Section:
    kind = data.get("analysis", path.parent.name)
    where = path.parent.name
    section = _Section(f"Analysis: {where}/{path.stem}", command=data.get("command"))
    if data.get("checkpoint"):
        section.notes.append(
            f"checkpoint {data['checkpoint']} (epoch {_fmt(data.get('epoch'))}), "
            f"{data.get('dataset', '?')} {data.get('split', '')} split, "
            f"{_fmt(data.get('seconds'))} s"
        )
    renderer = _RENDERERS.get(kind, _render_generic)
    renderer(section, data)
    png = path.with_suffix(".png")
    if png.is_file():
        section.images.append(png)
    return section


def _render_subnets(section: _Section, data: dict[str, Any]) -> None:
    section.notes.append(
        f"space {data['space']} ({data['space_size']} sub-networks), BN {data['bn']}; main "
        f"network with its own BN statistics: {_fmt(data['main']['acc'])}%"
    )
    section.table("Top-1 over the sub-networks (%)", _STATS_HEADERS, [_stats_row(data["stats"])])
    rows = sorted(data["subnets"], key=lambda r: r["acc"])
    if len(rows) > 20:
        rows = rows[:10] + rows[-10:]
        title = "Ten lowest and ten highest sub-networks"
    else:
        title = "Every sub-network"
    section.table(
        title,
        ["sub-network", "blocks", "top-1 (%)", "top-5 (%)"],
        _fields(rows, "subnet", "blocks", "acc", "acc5"),
    )
    section.records(
        "Trained individually vs. inside the main network",
        data.get("individual"),
        {"model": "label", "sub-network": "subnet", "alone (%)": "acc", "inside (%)": "acc_inside"},
    )


def _render_matrix(section: _Section, data: dict[str, Any]) -> None:
    section.notes.append(
        f"rows: trained models; columns: architectures run inside them; {data['bn']}"
    )
    section.table(
        "Top-1 (%)",
        ["trained model", *data["architectures"]],
        [[name, *row] for name, row in zip(data["models"], data["acc"])],
    )


def _render_destruct(section: _Section, data: dict[str, Any]) -> None:
    section.notes.append(f"intact network: {_fmt(data['intact']['acc'])}%, BN {data['bn']}")
    section.table(
        "Deleting one block",
        ["block", "stage", "index in stage", "top-1 (%)", "drop"],
        _fields(data["delete_one"], "index", "stage", "block", "acc", "drop"),
    )
    for key, what in (
        ("delete", "Deleting k blocks"),
        ("permute", "Permuting by k transpositions"),
    ):
        if data.get(key):
            section.table(
                f"{what}: drop in points",
                ["k", "combinations", "evaluated", "max", "mean", "std", "min"],
                [
                    [
                        g["k"],
                        g["total"],
                        g["evaluated"],
                        g["stats"]["max"],
                        g["stats"]["mean"],
                        g["stats"]["std"],
                        g["stats"]["min"],
                    ]
                    for g in data[key]
                ],
            )
    section.records(
        "Swaps",
        data.get("swaps"),
        {"swap": "swap", "sub-network": "subnet", "top-1 (%)": "acc", "drop": "drop"},
    )


def _render_lesion(section: _Section, data: dict[str, Any]) -> None:
    policies = data["bn"]
    section.notes.append(
        "intact network: "
        + ", ".join(f"{_fmt(data['intact'][p])}% ({p} BN)" for p in policies)
        + "; ratio = ||block(x) - x|| / ||x|| on evaluation images (small: a block that passes "
        "its input on nearly unchanged)"
    )
    headers = ["block", "stage", "in stage", "ratio"]
    headers += [f"{what} {p}" for p in policies for what in ("top-1", "drop")]
    rows = [
        [r["index"], r["stage"], r["block"], r["norm_ratio"]]
        + [r[p][key] for p in policies for key in ("acc", "drop")]
        for r in data["blocks"]
    ]
    section.table("Deleting one block: top-1 (%) and drop (points)", headers, rows)
    headers = ["k"] + [f"{what} {p}" for p in policies for what in ("worst", "best", "random")]
    rows = []
    for i, k in enumerate(data["ks"]):
        row: list[Any] = [k]
        for p in policies:
            curve = data["curves"][p][i]
            random = curve["random"]
            row += [curve["worst"]["acc"], curve["best"]["acc"], random and random["acc_mean"]]
        rows.append(row)
    section.table(
        "Deleting k blocks: top-1 (%) without the k most harmful (worst), least harmful (best) "
        f"and {data['random_draws']} random sets of k blocks (mean)",
        headers,
        rows,
    )


def _loafing_summary(sections: Sequence[_Section], analyses: dict[str, dict[str, Any]]) -> None:
    """With a lesion analysis, a first section that answers "does it loaf, and where": the
    blocks deleted at least cost, and the sub-network spread when it was measured."""
    data = analyses.get("lesion")
    if data is None:
        return
    policy = data["bn"][-1]
    blocks = sorted(data["blocks"], key=lambda r: r[policy]["drop"])
    section = _Section("Does it loaf, and where?", command=data.get("command"))
    section.notes.append(
        f"{len(blocks)} blocks can be deleted alone; with BN {policy} the intact network scores "
        f"{_fmt(data['intact'][policy])}%. Deleting a loafing block costs little."
    )
    section.table(
        "The five cheapest and the five dearest blocks to delete",
        ["block", "stage", "in stage", "drop (points)", "ratio"],
        [
            [r["index"], r["stage"], r["block"], r[policy]["drop"], r["norm_ratio"]]
            for r in (blocks[:5] + blocks[-5:] if len(blocks) > 10 else blocks)
        ],
    )
    subnets = analyses.get("subnets")
    if subnets is not None:
        section.table(
            "Sub-network spread (top-1 %, BN re-estimated per sub-network)",
            _STATS_HEADERS,
            [_stats_row(subnets["stats"])],
        )
    sections.insert(0, section)


def _render_kl(section: _Section, data: dict[str, Any]) -> None:
    section.table(*_kl_table(data["summary"]))


def _render_logits(section: _Section, data: dict[str, Any]) -> None:
    section.table(
        "",
        ["model", "mean L2 norm", "std", "top-1 (%)", "images"],
        _fields(data["models"], "label", "mean_norm", "std_norm", "acc", "images"),
    )


def _render_erf(section: _Section, data: dict[str, Any]) -> None:
    section.notes.append(
        f"input {data['input_size']}x{data['input_size']}, {data['images']} images, "
        f"sub-network {data.get('subnet') or 'main network'}"
    )
    ratios = data["area_ratios"]
    section.table(
        "Area of the smallest centred square holding a share t of the contribution",
        [f"t = {t}" for t in ratios],
        [list(ratios.values())],
    )


def _render_select(section: _Section, data: dict[str, Any]) -> None:
    split = data["selection_split"]
    section.notes.append(
        f"{data['evaluated']}; selection on {split}, test beside it; budget: "
        f"{data.get('budget_text', '–')}; BN {data['bn']}"
    )
    if data.get("latency"):
        section.notes.append(describe_latency(data["latency"]))
        if predictor := describe_predictor(data["latency"]):
            section.notes.append(predictor)
    front = sorted((r for r in data["subnets"] if r["on_front"]), key=lambda r: r["flops"])
    pick, main = data["pick"]["subnet"], data["main"]["subnet"]
    section.table(
        f"Pareto front, {split} top-1 vs FLOPs (pick {pick}, main network {main})",
        ["sub-network", "MFLOPs", "M params", "val (%)", "test (%)", "ms", "fits", ""],
        [
            [
                r["subnet"],
                r["flops"] / 1e6,
                r["params"] / 1e6,
                r["val_acc"],
                r["test_acc"],
                r.get("latency_ms"),
                r["fits_budget"],
                " ".join(
                    word
                    for word, flag in (("pick", r["subnet"] == pick), ("main", r["is_main"]))
                    if flag
                ),
            ]
            for r in front
        ],
    )


def _render_generic(section: _Section, data: dict[str, Any]) -> None:
    rows = [[k, v] for k, v in data.items() if isinstance(v, (int, float, str)) and k != "command"]
    section.table("", ["", "value"], rows)


_RENDERERS = {
    "subnets": _render_subnets,
    "matrix": _render_matrix,
    "destruct": _render_destruct,
    "lesion": _render_lesion,
    "kl-drift": _render_kl,
    "logits": _render_logits,
    "erf": _render_erf,
    "select": _render_select,
}


# ----------------------------------------------------------------------- rendering
def _markdown(title: str, config: str | None, sections: Sequence[_Section], run: Path) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        if section.command:
            lines += [f"Command: `{section.command}`", ""]
        lines += [*(f"{note}  " for note in section.notes), ""] if section.notes else []
        for caption, headers, rows in section.tables:
            if caption:
                lines += [f"**{caption}**", ""]
            lines.append("| " + " | ".join(headers) + " |")
            lines.append("|" + "---|" * len(headers))
            lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
            lines.append("")
        for image in section.images:
            lines += [f"![{section.title}]({image.relative_to(run).as_posix()})", ""]
    if config is not None:
        lines += ["## Configuration", "", "```yaml", config.rstrip(), "```", ""]
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
code, pre { background: #f4f4f4; padding: 2px 4px; border-radius: 3px; }
pre { padding: 1em; overflow-x: auto; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #eee; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
.caption { font-weight: bold; margin-top: 1em; }
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _html(title: str, config: str | None, sections: Sequence[_Section]) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    for section in sections:
        parts.append(f"<section><h2>{esc(section.title)}</h2>")
        if section.command:
            parts.append(f"<p>Command: <code>{esc(section.command)}</code></p>")
        parts += [f"<p>{esc(note)}</p>" for note in section.notes]
        for caption, headers, rows in section.tables:
            if caption:
                parts.append(f'<div class="caption">{esc(caption)}</div>')
            parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr>")
            for row in rows:
                parts.append("<tr>" + "".join(f"<td>{esc(_fmt(v))}</td>" for v in row) + "</tr>")
            parts.append("</table>")
        for image in section.images:
            parts.append(f'<img alt="{esc(section.title)}" src="{_data_uri(image)}">')
        parts.append("</section>")
    if config is not None:
        parts.append(f"<section><h2>Configuration</h2><pre>{esc(config)}</pre></section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``RUN/report.md`` and ``RUN/report.html`` for a run folder.

    Returns:
        The paths of the Markdown and the HTML file.

    Raises:
        ConfigError: not a folder, or a folder with nothing to report.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(
            f"run folder {str(run)!r} does not exist: give a folder that `nestedtrain train` wrote"
        )
    out = run / REPORT_FILES
    config_path = run / CONFIG_FILE
    config = config_path.read_text() if config_path.is_file() else None
    sections = _training(run, out)
    analyses = sorted((run / "analysis").glob("*/*.json")) if (run / "analysis").is_dir() else []
    kinds: dict[str, dict[str, Any]] = {}
    for path in analyses:
        data = _read_json(path)
        if isinstance(data, dict):
            kinds[data.get("analysis")] = data
            sections.append(_analysis_section(path, data))
    _loafing_summary(sections, kinds)
    if "kl-drift" not in kinds:
        kl = _kl_from_training(run, out)
        if kl is not None:
            sections.append(kl)
    if not sections and config is None:
        raise ConfigError(
            f"{str(run)!r} holds no config.yaml, metrics.jsonl, summary.json or analysis/: "
            "give a run folder that `nestedtrain train` wrote"
        )
    # a folder of analyses of a model trained elsewhere has no recipe of its own
    title = f"nestedtrain {'run' if config is not None else 'analyses'} {run.resolve().name}"
    md_path, html_path = run / "report.md", run / "report.html"
    atomic_write_text(md_path, _markdown(title, config, sections, run))
    atomic_write_text(html_path, _html(title, config, sections))
    return md_path, html_path
