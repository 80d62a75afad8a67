"""Latency where the model will be served: a kit timed there, a table, an additive predictor.

:func:`write_latency_kit` writes, for a model and the sub-networks to time, a folder a user
copies to the serving device: one ONNX file per sub-network (exported and checked as
:func:`~nestedtrain.deploy.export_onnx` does), ``manifest.json`` (what each file is,
its FLOPs, parameters and sha256, the model's identity and input shape) and ``measure.py``
(:mod:`.kit_measure`, which needs only Python 3, numpy and onnxruntime). Run there, it writes
``latency.json``; :func:`read_latency_table` reads that table back for ``select``, refusing one
made for another architecture or input shape.

The kit's sub-networks have roles: ``front`` (the accuracy-vs-FLOPs Pareto front a caller
chose), ``main`` (the main network), ``fit`` (the smallest sub-network, for each stage the
smallest with that stage at its largest depth, so that the additive model is determined even
when the front is short, and a seeded spread of others, so that the fit is not made of the
space's corners alone) and ``held_out`` (a seeded spread of the rest, never fitted on: the
predictor's error is measured on them).

The predictor: ordered sub-networks are nearly additive in blocks per stage, so
``ms ~ c + sum_s blocks_s * cost_s``, fitted by least squares on every measured file but the
held-out ones (:func:`.kit_measure.fit_additive`, the same code ``measure.py`` runs).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_write_text
from ..deploy import export_onnx, require_onnx
from ..elastic.stages import find_stages, model_family, unwrap
from ..elastic.subnet import Subnet, export_subnet
from ..errors import ConfigError
from ..flops import count_flops, count_params
from ..version import __version__
from .kit_measure import KIT_FORMAT, file_sha256, predict
from .kit_measure import predictor as fit_predictor

# copied into every kit as measure.py: it runs there without torch or nestedtrain
_MEASURE_SCRIPT = Path(__file__).with_name("kit_measure.py")

__all__ = [
    "LatencyTable",
    "check_kit_folder",
    "describe_latency",
    "describe_predictor",
    "kit_subnets",
    "model_identity",
    "read_latency_table",
    "write_latency_kit",
]

_ROLES = ("front", "main", "fit", "held_out")


# ------------------------------------------------------------------------------ identity
def model_identity(
    model: nn.Module, model_name: str, in_chans: int, input_size: int
) -> dict[str, Any]:
    """What a latency table is valid for: the architecture (a hash of every parameter's and
    buffer's name and shape, so widths, depths and class counts all count; the weights do
    not) and the input shape. Every run of the same model and input size shares it."""
    model = unwrap(model)
    shapes = sorted((name, list(t.shape)) for name, t in model.state_dict().items())
    digest = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()
    return {
        "name": model_name,
        "family": model_family(model),
        "blocks_per_stage": [len(stage) for stage in find_stages(model)],
        "architecture_sha256": digest,
        "input_shape": [in_chans, input_size, input_size],
    }


def _describe_identity(identity: dict[str, Any]) -> str:
    blocks = "-".join(str(n) for n in identity["blocks_per_stage"])
    shape = "x".join(str(n) for n in identity["input_shape"])
    return f"{identity['name']} (blocks {blocks}) on {shape} input"


# ----------------------------------------------------------------------------------- kit
def _stage_spread(pool: Sequence[Subnet]) -> list[Subnet]:
    """The smallest of ``pool``, and per stage the member that differs from it in that stage
    only, by the most blocks: enough points to fit one cost per stage."""
    smallest = min(pool, key=lambda s: (s.num_blocks, str(s)))
    counts = [len(kept) for kept in smallest.blocks]
    picked = [smallest]
    for s in range(len(counts)):
        alike = [
            p
            for p in pool
            if all(len(k) == c for t, (k, c) in enumerate(zip(p.blocks, counts)) if t != s)
        ]
        widest = max(alike, key=lambda p: (len(p.blocks[s]), str(p)))
        if len(widest.blocks[s]) > counts[s]:
            picked.append(widest)
    return picked


def kit_subnets(
    model: nn.Module,
    front: Sequence[Subnet],
    pool: Sequence[Subnet],
    held_out: int = 8,
    seed: int = 0,
    fit: int = 8,
) -> list[tuple[Subnet, str]]:
    """The sub-networks of a kit with their roles (see the module docstring), in that order.

    Args:
        model: the main network.
        front: the sub-networks the caller wants timed (e.g. the Pareto front in a budget).
        pool: where the ``fit`` and ``held_out`` sub-networks come from (e.g. every ordered
            sub-network).
        held_out: how many others to draw, seeded, for the predictor's held-out check.
        seed: of the draws (a dedicated generator; the global one is left alone).
        fit: how many others to draw for the fit, besides the front, the main network and
            the per-stage corners.
    """
    main = Subnet.full(model)
    chosen: dict[Subnet, str] = {s: "front" for s in front if s != main}
    chosen[main] = "main"
    for subnet in _stage_spread(list(pool)):
        chosen.setdefault(subnet, "fit")
    others = sorted(s for s in dict.fromkeys(pool) if s not in chosen)
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.randperm(len(others), generator=generator).tolist()
    for n, i in enumerate(drawn[: fit + held_out]):
        chosen[others[i]] = "fit" if n < fit else "held_out"
    return sorted(chosen.items(), key=lambda item: (_ROLES.index(item[1]), item[0].num_blocks))


def _file_name(i: int, subnet: Subnet) -> str:
    return f"{i:03d}_{subnet}.onnx"


def _kit_entry(
    model: nn.Module, subnet: Subnet, role: str, folder: Path, i: int, images: torch.Tensor
) -> dict[str, Any]:
    """Export one sub-network into ``folder``; its manifest entry."""
    name = _file_name(i, subnet)
    export_onnx(export_subnet(model, subnet), folder / name, images)
    return {
        "subnet": str(subnet),
        "role": role,
        "blocks_per_stage": [len(kept) for kept in subnet.blocks],
        "flops": count_flops(model, images.shape[-1], images.shape[1], subnet=subnet),
        "params": count_params(model, subnet=subnet),
        "file": name,
        "sha256": file_sha256(folder / name),
    }


def check_kit_folder(out: str | Path) -> None:
    """Refuse ``out`` for a new kit unless it is a new or empty folder."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            f"{out} already exists and is not an empty folder: give a new --out for the kit"
        )


def write_latency_kit(
    model: nn.Module,
    subnets: Sequence[tuple[Subnet, str]],
    out: str | Path,
    *,
    model_name: str,
    input_size: int,
    in_chans: int,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a latency kit into the new folder ``out``: ONNX files, ``manifest.json``,
    ``measure.py``. The folder appears whole or not at all.

    Args:
        model: the main network (its weights are exported as they are: the files are for
            timing, so BN statistics are not re-estimated per sub-network).
        subnets: ``(sub-network, role)`` pairs, e.g. from :func:`kit_subnets`.
        out: a folder that does not exist yet (or is empty).
        model_name, input_size, in_chans: the model's name and the input it takes.
        source: what the kit was made from, recorded in the manifest (run, command, ...).

    Returns:
        The manifest.

    Raises:
        ConfigError: ``out`` is taken, onnx/onnxruntime are missing, an unknown role, or an
            export fails its check against PyTorch.
    """
    require_onnx()
    out = Path(out)
    check_kit_folder(out)
    if bad := [role for _, role in subnets if role not in _ROLES]:
        raise ConfigError(f"kit roles {bad}: use {', '.join(_ROLES)}")
    model = unwrap(model)
    # Random images are enough for the export's parity check: the files are timed, not scored.
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(8, in_chans, input_size, input_size, generator=generator)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        files = [
            _kit_entry(model, subnet, role, staging, i, images)
            for i, (subnet, role) in enumerate(subnets)
        ]
        manifest = _manifest(model, model_name, in_chans, input_size, files, source)
        atomic_write_text(staging / "manifest.json", json.dumps(manifest, indent=2) + "\n")
        shutil.copyfile(_MEASURE_SCRIPT, staging / "measure.py")
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _manifest(
    model: nn.Module,
    model_name: str,
    in_chans: int,
    input_size: int,
    files: list[dict[str, Any]],
    source: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "format": KIT_FORMAT,
        "kind": "nestedtrain latency kit",
        "model": model_identity(model, model_name, in_chans, input_size),
        "input_name": "images",
        "input_shape": [1, in_chans, input_size, input_size],
        "dtype": "float32",
        "weights": "the main network's, BN statistics not re-estimated: for timing only",
        "nestedtrain": __version__,
        "source": source or {},
        "roles": {role: sum(f["role"] == role for f in files) for role in _ROLES},
        "files": files,
    }


# --------------------------------------------------------------------------------- table
@dataclass(frozen=True)
class LatencyTable:
    """A ``latency.json`` read for one model: measured latencies, and the additive model
    where its held-out error is within ``max_error``."""

    path: str
    table: dict[str, Any]
    measured: dict[str, float]  # sub-network -> median ms
    predictor: dict[str, Any]  # kit_measure.predictor(...) of the table's entries
    max_error: float  # largest worst-case held-out relative error at which it predicts

    @property
    def refusal(self) -> str | None:
        """Why the additive model does not predict, or ``None`` when it does."""
        held = self.predictor.get("held_out")
        if self.predictor.get("fit") is None:
            return self.predictor.get("why", "no fit")
        if held is None:
            return "no held-out sub-network was measured, so its error is unknown"
        if held["worst"] > self.max_error:
            return (
                f"its worst held-out error, {100 * held['worst']:.1f}%, is above the "
                f"{100 * self.max_error:g}% allowed"
            )
        return None

    def latency(self, subnet: Subnet) -> tuple[float | None, str | None]:
        """``(ms, "measured")``, ``(ms, "predicted")``, or ``(None, None)``."""
        key = str(subnet)
        if key in self.measured:
            return self.measured[key], "measured"
        if self.refusal is not None:
            return None, None
        blocks = [len(kept) for kept in subnet.blocks]
        return predict(self.predictor["fit"], blocks), "predicted"

    def summary(self) -> dict[str, Any]:
        """What ``select.json`` records about the table."""
        return {
            "source": "table",
            "table": self.path,
            "machine": self.table["machine"],
            "batch": self.table["batch"],
            "timing": self.table["timing"],
            "measured_subnets": len(self.measured),
            "predictor": self.predictor,
            "max_prediction_error": self.max_error,
            "predicting": self.refusal is None,
            "refusal": self.refusal,
        }


def read_latency_table(
    path: str | Path, identity: dict[str, Any], max_error: float = 0.2
) -> LatencyTable:
    """Read ``latency.json`` for the model of ``identity`` (:func:`model_identity`).

    Raises:
        ConfigError: not a latency table, one made for another architecture or input shape,
            or a ``max_error`` that is not a positive fraction.
    """
    if not (math.isfinite(max_error) and max_error > 0):
        raise ConfigError(f"maximum prediction error {max_error!r}: give a positive number")
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"latency table {path} does not exist") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"latency table {path} is not readable JSON: {err}") from None
    if not isinstance(table, dict) or table.get("kind") != "nestedtrain latency table":
        raise ConfigError(
            f"{path} is not a latency table: give the latency.json that the kit's measure.py wrote"
        )
    if table.get("format") != KIT_FORMAT:
        raise ConfigError(
            f"{path} is a latency table of format {table.get('format')!r}; this nestedtrain reads "
            f"format {KIT_FORMAT}: measure the kit again with its measure.py"
        )
    try:
        theirs, entries = table["model"], table["entries"]
        ours = (theirs["architecture_sha256"], theirs["input_shape"])
        measured = {e["subnet"]: float(e["ms"]) for e in entries}
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            f"{path} lacks the model, its entries or their latencies: give a whole latency.json "
            "as measure.py wrote it"
        ) from None
    if ours != (identity["architecture_sha256"], identity["input_shape"]):
        raise ConfigError(
            f"{path} was measured for {_describe_identity(theirs)}, not for this "
            f"{_describe_identity(identity)} (architecture or input shape differs): make a "
            "kit for this model with nestedtrain latency-kit"
        )
    return LatencyTable(
        path=str(path),
        table=table,
        measured=measured,
        predictor=fit_predictor(entries),
        max_error=max_error,
    )


# ------------------------------------------------------------------------------- wording
def threads_text(threads: int | str) -> str:
    """``2 thread(s)``, or onnxruntime's default when ``measure.py`` was not given one."""
    return f"{threads} thread(s)" if isinstance(threads, int) else "onnxruntime's default threads"


def describe_latency(spec: dict[str, Any]) -> str:
    """Where the latencies of a selection (``select.json``'s ``latency``) come from."""
    if spec.get("source") != "table":
        return (
            f"latency measured on {spec['device']}, batch {spec['batch']}, {spec['threads']} "
            f"thread(s): median of {spec['repeats']} runs in {spec.get('rounds', 1)} "
            f"interleaved rounds after {spec['warmup']} warm-up"
        )
    machine, timing = spec["machine"], spec["timing"]
    return (
        f"latency from the table {spec['table']}: measured with onnxruntime "
        f"{machine['onnxruntime']} ({', '.join(machine['providers'])}, "
        f"{threads_text(machine['threads'])}) on {machine['cpu']} ({machine['cores']} cores), "
        f"batch {spec['batch']}: "
        f"median of {timing['repeats']} runs in {timing['rounds']} interleaved rounds after "
        f"{timing['warmup']} warm-up; {spec['measured_subnets']} sub-networks measured there"
    )


def describe_predictor(spec: dict[str, Any]) -> str | None:
    """The additive predictor of a table-based selection, its held-out error, and whether
    it predicts; ``None`` for latencies measured locally."""
    if spec.get("source") != "table":
        return None
    predictor = spec["predictor"]
    held = predictor.get("held_out")
    text = f"additive predictor (c + per-stage block cost, fitted on {predictor['fitted_on']} "
    text += "measured sub-networks)"
    if held:
        text += (
            f": held-out relative error median {100 * held['median']:.1f}%, worst "
            f"{100 * held['worst']:.1f}%, {100 * held['within_10pct']:.0f}% within ±10% "
            f"({held['n']} held out)"
        )
    if spec["predicting"]:
        limit = 100 * spec["max_prediction_error"]
        return text + f"; it predicts the other sub-networks (limit {limit:g}% worst)"
    return text + f"; NOT used: {spec['refusal']}; only measured sub-networks have a latency"
