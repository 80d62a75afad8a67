#!/usr/bin/env python3
"""Time the ONNX files of a nestedtrain latency kit on the machine it runs on.

Needs only Python 3, numpy and onnxruntime: no torch, no nestedtrain. Run it on the device
the model will be served on::

    python measure.py --out latency.json [--batch 1] [--threads N] [--providers P1,P2]

It checks every file of ``manifest.json`` against its sha256, times each (warm-up runs, then
timed runs interleaved over all files in rounds, so that a burst of other work slows all of
them alike; the median and the quartiles of every timed run), fits the additive latency model
``ms = c + sum over stages of (blocks in the stage) * (cost of one block there)`` by least
squares on the files that are not held out, reports its relative error on the held-out files,
and writes ``latency.json`` (the machine, the settings, every file's latency, the fit).
``nestedtrain select RUN --latency-table latency.json`` reads that file.

This file is a program of its own: ``nestedtrain latency-kit`` copies it into every kit as
``measure.py``, and nestedtrain imports its fitting functions (numpy only) so that the kit and
``select`` fit the same way. That is why it prints: :func:`main` is the kit's command line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

KIT_FORMAT = 1  # manifest.json's and latency.json's "format"; bumped when either changes
WITHIN = 0.10  # the share of held-out files predicted within +-10% is reported


class KitError(Exception):
    """Bad input: a kit that is not whole, an option that cannot work here."""


# ------------------------------------------------------------------------------- the kit
def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(kit: Path) -> dict[str, Any]:
    """``kit/manifest.json``, every file it lists checked against its sha256.

    Raises:
        KitError: no manifest, a file missing, or a file whose bytes changed.
    """
    path = kit / "manifest.json"
    if not path.is_file():
        raise KitError(
            f"{kit} holds no manifest.json: give the folder nestedtrain latency-kit wrote"
        )
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise KitError(f"{path} is not readable JSON ({err}): make the kit again") from None
    if manifest.get("format") != KIT_FORMAT:
        raise KitError(
            f"{path} is of format {manifest.get('format')!r}; this script reads {KIT_FORMAT}"
        )
    for entry in manifest["files"]:
        onnx = kit / entry["file"]
        if not onnx.is_file():
            raise KitError(f"{onnx} is missing: copy the whole kit folder, or make the kit again")
        if file_sha256(onnx) != entry["sha256"]:
            raise KitError(
                f"{onnx} has changed since the kit was made (sha256 differs from manifest.json): "
                "copy it again, or make the kit again"
            )
    return manifest


def machine_info(ort: Any, providers: Sequence[str], threads: Optional[int]) -> dict[str, Any]:
    """What the latencies were measured on."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "providers": list(providers),
        "available_providers": list(ort.get_available_providers()),
        "threads": threads if threads else "onnxruntime default",
    }


def _cpu_model() -> str:
    try:  # Linux names the CPU here; platform.processor() is often empty there
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("model name", "Hardware", "Model"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


# --------------------------------------------------------------------------------- timing
def time_interleaved(
    runs: Sequence[Any], warmup: int, repeats: int, rounds: int, progress: Any = None
) -> list[list[float]]:
    """Every timed run of each of ``runs`` (callables), in milliseconds.

    Round r runs each callable in turn: its warm-up (all of ``warmup`` in round 0, 2 after),
    then its share of ``repeats``; ``progress(round, index)`` is called before each.
    """
    rounds = max(1, min(rounds, repeats))
    samples: list[list[float]] = [[] for _ in runs]
    for r in range(rounds):
        share = repeats // rounds + (1 if r < repeats % rounds else 0)
        for i, run in enumerate(runs):
            if progress is not None:
                progress(r, i)
            for _ in range(warmup if r == 0 else min(warmup, 2)):
                run()
            for _ in range(share):
                start = time.perf_counter()
                run()
                samples[i].append(1e3 * (time.perf_counter() - start))
    return samples


def summarise(samples_ms: Sequence[float]) -> dict[str, Any]:
    """Median and spread (quartiles, extremes) of timed runs."""
    q1, _, q3 = (
        statistics.quantiles(samples_ms, n=4) if len(samples_ms) > 1 else [samples_ms[0]] * 3
    )
    return {
        "ms": statistics.median(samples_ms),
        "p25_ms": q1,
        "p75_ms": q3,
        "min_ms": min(samples_ms),
        "max_ms": max(samples_ms),
        "samples_ms": list(samples_ms),
    }


# ------------------------------------------------------------------------ additive model
def fit_additive(blocks: Sequence[Sequence[int]], ms: Sequence[float]) -> Optional[dict[str, Any]]:
    """Least-squares fit of ``ms ~ c + sum_s blocks[s] * cost[s]``; ``None`` when the
    measurements do not determine every cost (fewer independent rows than unknowns).

    A stage whose block count is the same in every measurement has no cost of its own (it is
    part of ``c``): ``fixed_blocks`` records its count, and :func:`predict` predicts only
    sub-networks with that count there.

    Args:
        blocks: per measured sub-network, the number of blocks it runs in each stage.
        ms: its measured latency.
    """
    counts = np.asarray(blocks, dtype=float)
    varying = [s for s in range(counts.shape[1]) if np.ptp(counts[:, s]) > 0]
    design = np.column_stack([np.ones(len(counts)), counts[:, varying]])
    if np.linalg.matrix_rank(design) < design.shape[1]:
        return None
    coef, *_ = np.linalg.lstsq(design, np.asarray(ms, dtype=float), rcond=None)
    costs = [0.0] * counts.shape[1]
    for j, s in enumerate(varying):
        costs[s] = float(coef[1 + j])
    fixed = {str(s): int(counts[0, s]) for s in range(counts.shape[1]) if s not in varying}
    return {"intercept_ms": float(coef[0]), "block_ms": costs, "fixed_blocks": fixed}


def predict(fit: dict[str, Any], blocks: Sequence[int]) -> Optional[float]:
    """The additive model's latency for a sub-network running ``blocks[s]`` blocks in stage
    ``s``; ``None`` where it differs from a stage count the fit never saw vary."""
    if any(blocks[int(s)] != n for s, n in fit.get("fixed_blocks", {}).items()):
        return None
    return fit["intercept_ms"] + sum(n * c for n, c in zip(blocks, fit["block_ms"]))


def relative_errors(
    fit: dict[str, Any], blocks: Sequence[Sequence[int]], ms: Sequence[float]
) -> dict[str, Any]:
    """How far the fit is from measurements: median and worst ``|predicted - measured| /
    measured``, and the share within +-10%. One it cannot predict counts as 100% off."""
    predicted = [predict(fit, b) for b in blocks]
    errors = [1.0 if p is None else abs(p - m) / m for p, m in zip(predicted, ms)]
    return {
        "n": len(errors),
        "median": statistics.median(errors),
        "worst": max(errors),
        "within_10pct": sum(e <= WITHIN for e in errors) / len(errors),
    }


def predictor(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The additive model fitted on the entries not held out, with its error on the held-out
    ones (``held_out``: ``None`` when none were measured) and on those it was fitted on."""
    fit_on = [e for e in entries if e["role"] != "held_out"]
    held = [e for e in entries if e["role"] == "held_out"]
    fit = fit_additive([e["blocks_per_stage"] for e in fit_on], [e["ms"] for e in fit_on])
    if fit is None:
        return {
            "model": "c + sum_s blocks_s * cost_s",
            "fit": None,
            "fitted_on": len(fit_on),
            "why": "the measured sub-networks do not determine every stage's block cost",
        }
    return {
        "model": "c + sum_s blocks_s * cost_s",
        "fit": fit,
        "fitted_on": len(fit_on),
        "fit_error": relative_errors(
            fit, [e["blocks_per_stage"] for e in fit_on], [e["ms"] for e in fit_on]
        ),
        "held_out": relative_errors(
            fit, [e["blocks_per_stage"] for e in held], [e["ms"] for e in held]
        )
        if held
        else None,
    }


# --------------------------------------------------------------------------------- main
def _sessions(
    ort: Any, kit: Path, files: Sequence[dict], providers: list[str], threads: Optional[int]
) -> list[Any]:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return [ort.InferenceSession(str(kit / e["file"]), options, providers=providers) for e in files]


def _progress(total_rounds: int, files: Sequence[dict]) -> Any:
    live = sys.stderr.isatty()

    def show(r: int, i: int) -> None:
        text = f"round {r + 1}/{total_rounds}, file {i + 1}/{len(files)}: {files[i]['subnet']}"
        if live:
            sys.stderr.write("\r" + text.ljust(60))
        elif i == 0:  # a log file gets one line a round
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    return show


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (a :class:`KitError`), not a usage block."""

    def error(self, message: str) -> Any:
        raise KitError(message)


def _options(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = _Parser(prog="measure.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--kit",
        default=str(Path(__file__).resolve().parent),
        help="the kit folder (default: this file's)",
    )
    parser.add_argument(
        "--out", default="latency.json", help="where to write the table (default latency.json)"
    )
    parser.add_argument("--batch", type=int, default=1, help="images per run (default 1)")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="onnxruntime intra-op threads (default: its own choice)",
    )
    parser.add_argument(
        "--providers",
        default="CPUExecutionProvider",
        help="comma-separated, in order of preference",
    )
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per file (default 30)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="of the random input (default 0)")
    args = parser.parse_args(argv)
    for flag, value, least in (
        ("--batch", args.batch, 1),
        ("--threads", args.threads, 0),
        ("--warmup", args.warmup, 0),
        ("--repeats", args.repeats, 1),
        ("--rounds", args.rounds, 1),
    ):
        if value < least:
            raise KitError(f"{flag} {value} must be >= {least}")
    return args


def _import_onnxruntime(providers: list[str]) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise KitError(
            "this script needs onnxruntime: pip install onnxruntime (and numpy)"
        ) from None
    missing = [p for p in providers if p not in ort.get_available_providers()]
    if missing:
        raise KitError(
            f"--providers {','.join(missing)}: not available here; available: "
            f"{','.join(ort.get_available_providers())}"
        )
    return ort


def measure(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """Time the kit as ``args`` say; returns the table and where it was written."""
    kit = Path(args.kit)
    manifest = read_manifest(kit)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    ort = _import_onnxruntime(providers)
    files = manifest["files"]
    sessions = _sessions(ort, kit, files, providers, args.threads or None)
    shape = [args.batch, *manifest["input_shape"][1:]]
    images = np.random.default_rng(args.seed).standard_normal(shape).astype(np.float32)
    runs = [(lambda s=s: s.run(None, {manifest["input_name"]: images})) for s in sessions]
    samples = time_interleaved(
        runs,
        args.warmup,
        args.repeats,
        args.rounds,
        _progress(min(args.rounds, args.repeats), files),
    )
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    table = _table(args, manifest, shape, ort, sessions, samples)
    out = Path(args.out)
    temporary = out.with_name(out.name + ".tmp")
    try:
        temporary.write_text(json.dumps(table, indent=2) + "\n")
        os.replace(temporary, out)  # whole or not at all
    except OSError as err:
        raise KitError(f"cannot write {out}: {err.strerror}") from None
    return table, out


def _table(
    args: argparse.Namespace,
    manifest: dict[str, Any],
    shape: list[int],
    ort: Any,
    sessions: Sequence[Any],
    samples: Sequence[Sequence[float]],
) -> dict[str, Any]:
    """``latency.json``: the model, the machine, the settings, each file's timing, the fit."""
    files = manifest["files"]
    entries = [
        {
            **{
                k: e[k]
                for k in ("subnet", "role", "blocks_per_stage", "flops", "params", "file", "sha256")
            },
            **summarise(t),
        }
        for e, t in zip(files, samples)
    ]
    return {
        "format": KIT_FORMAT,
        "kind": "nestedtrain latency table",
        "model": manifest["model"],
        "input_shape": shape,
        "batch": args.batch,
        "machine": machine_info(ort, sessions[0].get_providers(), args.threads or None),
        "timing": {
            "warmup": args.warmup,
            "repeats": args.repeats,
            "rounds": min(args.rounds, args.repeats),
            "statistic": "median of the timed runs",
            "seed": args.seed,
        },
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "predictor": predictor(entries),
        "entries": entries,
    }


def _predictor_text(report: dict[str, Any]) -> str:
    if report["fit"] is None:
        return f"additive model: not fitted: {report['why']}"
    held = report["held_out"]
    if held is None:
        return "additive model: fitted, but no file was held out to measure its error"
    return (
        f"additive model (fitted on {report['fitted_on']}): held-out relative error median "
        f"{100 * held['median']:.1f}%, worst {100 * held['worst']:.1f}%, "
        f"{100 * held['within_10pct']:.0f}% within +-10% ({held['n']} held out)"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The kit's command line: 0 done, 2 bad input (one line on stderr)."""
    try:
        table, out = measure(_options(argv))
    except KitError as err:
        print(f"measure.py: error: {err}", file=sys.stderr)
        return 2
    machine = table["machine"]
    print(
        f"{len(table['entries'])} files timed on {machine['cpu']} ({machine['cores']} cores), "
        f"onnxruntime {machine['onnxruntime']}, {','.join(machine['providers'])}, threads "
        f"{machine['threads']}, batch {table['batch']}"
    )
    for e in table["entries"]:
        print(
            f"  {e['subnet']:<16} {e['role']:<9} {e['ms']:8.3f} ms  "
            f"(quartiles {e['p25_ms']:.3f}-{e['p75_ms']:.3f})"
        )
    print(_predictor_text(table["predictor"]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
