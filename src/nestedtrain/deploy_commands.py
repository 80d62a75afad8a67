"""``nestedtrain select`` and the work behind ``nestedtrain export``: cash in the sub-networks.

- ``select RUN --max-mflops X --max-params M --max-latency-ms T``: evaluate the sub-networks
  of a run (BN re-estimated for each, shared prefixes), choose on the validation split, print
  the Pareto front and the pick, write ``RUN/analysis/select/select.json`` and
  ``select.png``, and with ``--export PATH`` deploy the pick.
- :func:`export_files` (``nestedtrain export``, ``select --export``): a state_dict,
  TorchScript or ONNX file of a sub-network with its JSON sidecar
  (:func:`nestedtrain.analysis.deploy.deploy_subnet`).

Library code raises ValueError for bad input; these handlers print and return exit codes.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cli import _fmt

__all__ = [
    "add_export_options",
    "cmd_export",
    "cmd_select",
    "export_files",
    "print_export",
    "register",
]


@dataclass
class _Run:
    """A checkpoint with its model, recipe, data and run folder."""

    path: Path
    run: Path | None
    model: Any
    cfg: Any
    state: dict[str, Any]
    data: Any


def _open_run(checkpoint: str, device_name: str) -> _Run:
    from omegaconf import OmegaConf

    from .data import build_data
    from .engine.checkpoint import load_model, resolve_checkpoint
    from .engine.distributed import pick_device

    device = pick_device(device_name)
    path = resolve_checkpoint(checkpoint)
    model, cfg, state = load_model(path, map_location=device)
    model.to(device)
    run = path.parent.parent if path.parent.name == "checkpoints" else None
    if run is not None and not (run / "config.yaml").is_file():
        run = None
    data_cfg = OmegaConf.to_object(cfg.data)
    data = build_data(data_cfg, batch_size=cfg.batch_size, seed=cfg.seed, device=device)
    if (data.num_classes, data.in_chans) != (state["num_classes"], state["in_chans"]):
        raise ValueError(
            f"{path} predicts {state['num_classes']} classes from {state['in_chans']}-channel "
            f"images but {cfg.data.name} has {data.num_classes} and {data.in_chans}"
        )
    return _Run(path, run, model, cfg, state, data)


def _model_kwargs(cfg: Any) -> dict[str, Any]:
    """The keyword arguments the run's model was built with (see ``build_model``)."""
    from omegaconf import OmegaConf

    kwargs = dict(OmegaConf.to_container(cfg.model.kwargs, resolve=True))
    if cfg.model.drop_rate:
        kwargs["drop_rate"] = cfg.model.drop_rate
    if cfg.model.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.model.drop_path_rate
    return kwargs


def _preprocess(data: Any) -> str:
    size = data.test_img_size
    if data.cfg.name == "imagefolder":
        resize = math.floor(size / data.cfg.test_crop_pct)
        return (
            f"RGB image; resize the shorter side to {resize} (bilinear), centre-crop {size}x{size}; "
            "scale pixels to [0, 1]; subtract mean and divide by std per channel"
        )
    return (
        f"{data.in_chans}-channel image; resize to {size}x{size} (bilinear, antialiased) unless "
        "it is that size; scale pixels to [0, 1]; subtract mean and divide by std per channel"
    )


def _meta(run: _Run) -> dict[str, Any]:
    from . import __version__

    data = run.data
    return {
        "source_run": str(run.run) if run.run is not None else None,
        "checkpoint": str(run.path),
        "epoch": run.state.get("epoch"),
        "method": run.cfg.method,
        "dataset": run.cfg.data.name,
        "classes": list(data.classes),
        "input": {
            "size": data.test_img_size,
            "channels": data.in_chans,
            "mean": list(data.mean),
            "std": list(data.std),
            "preprocess": _preprocess(data),
        },
        "nestedtrain": __version__,
    }


def _batch_size(args: argparse.Namespace, cfg: Any) -> int:
    size = args.batch_size if args.batch_size is not None else cfg.eval.batch_size
    if size < 1:
        raise ValueError(f"--batch-size {size} must be >= 1")
    return size


def export_files(
    run: _Run,
    subnet: Any,
    out: str | Path,
    fmt: str | None,
    batch_size: int,
    recalibrate: bool = True,
) -> dict[str, Any]:
    """Deploy ``subnet`` of a run to ``out`` (+ sidecar); returns the sidecar."""
    from .analysis.deploy import deploy_subnet

    data = run.data
    splits = ("val", "test") if data.n_val > 0 else ("test",)
    evals = {s: (lambda s=s: data.eval_batches(s, batch_size=batch_size)) for s in splits}
    check_images = next(iter(data.eval_batches("test", batch_size=64)))[0]
    return deploy_subnet(
        run.model,
        subnet,
        out,
        fmt,
        input_size=data.test_img_size,
        in_chans=data.in_chans,
        num_classes=data.num_classes,
        model_name=run.cfg.model.name,
        model_kwargs=_model_kwargs(run.cfg),
        calib_batches=(lambda: data.calibration_batches(batch_size=batch_size))
        if recalibrate
        else None,
        eval_batches=evals,
        check_images=check_images,
        meta=_meta(run),
    )


def print_export(sidecar: dict[str, Any], out: str | Path) -> None:
    """What an export wrote, its accuracy and cost, the ONNX checks, and how to load it."""
    from .analysis.deploy import sidecar_path

    what = {"state_dict": "state_dict", "torchscript": "TorchScript", "onnx": "ONNX"}
    accuracy = ", ".join(f"{split} {acc:.2f}%" for split, acc in sidecar["accuracy"].items())
    print(
        f"wrote the {what[sidecar['format']]} of sub-network {sidecar['subnet']} to {out} and "
        f"{sidecar_path(out)}: {accuracy}, {sidecar['mflops']:.2f} MFLOPs, "
        f"{sidecar['params'] / 1e6:.3f} M parameters (BN: {sidecar['bn']})"
    )
    onnx = sidecar.get("onnx")
    if onnx:
        print(
            f"ONNX check: onnx.checker passed; onnxruntime {onnx['onnxruntime']} on "
            f"{onnx['parity_images']} test images: max |logits difference| vs PyTorch "
            f"{onnx['max_abs_diff']:.2e} (<= {onnx['tolerance']:g})"
        )
    for line in sidecar["rebuild"].values():
        print(f"load: {line}")


def cmd_export(args: argparse.Namespace) -> int:
    """``nestedtrain export``: one named sub-network to a file with its sidecar."""
    from .analysis.deploy import format_for, require_onnx
    from .elastic import Subnet

    if args.torchscript and args.format not in (None, "torchscript"):
        raise ValueError(f"--torchscript and --format {args.format} disagree: give one of them")
    fmt = format_for(args.out, "torchscript" if args.torchscript else args.format)
    if fmt == "onnx":
        require_onnx()
    run = _open_run(args.checkpoint, args.device)
    subnet = Subnet.parse(run.model, args.subnet)
    sidecar = export_files(
        run, subnet, args.out, fmt, _batch_size(args, run.cfg), recalibrate=args.bn == "recalibrate"
    )
    print_export(sidecar, args.out)
    return 0


def add_export_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``nestedtrain export`` after CHECKPOINT, --subnet and --out."""
    from .analysis.deploy import FORMATS

    parser.add_argument(
        "--format",
        choices=FORMATS,
        help="state_dict, torchscript or onnx (default: from the suffix: .onnx, .ts, else "
        "state_dict); onnx needs pip install 'nestedtrain[deploy]'",
    )
    parser.add_argument(
        "--torchscript", action="store_true", help="the same as --format torchscript"
    )
    parser.add_argument(
        "--bn",
        choices=("recalibrate", "own"),
        default="recalibrate",
        help="recalibrate (default): BN statistics re-estimated for the sub-network from training "
        "images, as its evaluation does; own: the main network's",
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument(
        "--batch-size", type=int, metavar="N", help="evaluation batch (default: the run's)"
    )


# ------------------------------------------------------------------------------- select
def _space(text: str) -> Any:
    """``full``, a named space (``space3``), N, or per-stage N,N,..."""
    if text == "full":
        return None
    compact = text.replace(" ", "")
    if compact.replace(",", "").isdigit():
        values = [int(v) for v in compact.split(",") if v]
        return values[0] if len(values) == 1 and "," not in compact else values
    return text


def _candidates(model: Any, args: argparse.Namespace) -> tuple[list[Any], dict[str, Any]]:
    """The sub-networks to evaluate, and how they were chosen."""
    from .analysis.subnets import space_subnets
    from .elastic import OrderedSampler

    if args.max_evaluated < 1:
        raise ValueError(f"--max-evaluated {args.max_evaluated} must be >= 1")
    space = _space(args.space)
    everything = OrderedSampler(model, max_drop=space).all()
    if len(everything) <= args.max_evaluated:
        how = f"all {len(everything)} ordered sub-networks of space {args.space}"
        return everything, {"how": how, "space_size": len(everything), "sample": None}
    chosen = space_subnets(model, space, sample=args.max_evaluated, seed=args.seed)
    smallest = min(everything, key=lambda s: s.num_blocks)
    full = max(everything, key=lambda s: s.num_blocks)
    chosen = list(dict.fromkeys([*chosen, smallest, full]))
    how = (
        f"a seeded sample (seed {args.seed}) of {len(chosen)} of the {len(everything)} ordered "
        f"sub-networks of space {args.space} (more than --max-evaluated {args.max_evaluated}), "
        "the smallest and the main network included"
    )
    return chosen, {"how": how, "space_size": len(everything), "sample": len(chosen)}


def _command(args: argparse.Namespace) -> str:
    words = ["nestedtrain", "select", args.run]
    options = [
        ("--max-mflops", args.max_mflops),
        ("--max-params", args.max_params),
        ("--max-latency-ms", args.max_latency_ms),
        ("--latency-device", args.latency_device),
        ("--latency-batch", args.latency_batch if args.latency_batch != 1 else None),
        ("--latency-repeats", args.latency_repeats if args.latency_repeats != 30 else None),
        ("--space", args.space if args.space != "full" else None),
        ("--max-evaluated", args.max_evaluated if args.max_evaluated != 1000 else None),
        ("--seed", args.seed if args.seed else None),
        ("--select-on", args.select_on if args.select_on != "val" else None),
        ("--export", args.export),
        ("--format", args.format),
        ("--device", args.device if args.device != "auto" else None),
        ("--batch-size", args.batch_size),
        ("--out", args.out),
    ]
    for flag, value in options:
        if value is not None:
            words += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return shlex.join(words)


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print(
        "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths)))
    )
    for row in rows:
        print(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        )


def _describe(row: dict[str, Any], acc: str) -> str:
    parts = [f"{acc.split('_')[0]} {row[acc]:.2f}%"]
    other = "test_acc" if acc == "val_acc" else "val_acc"
    if row.get(other) is not None:
        parts.append(f"{other.split('_')[0]} {row[other]:.2f}%")
    parts += [f"{row['flops'] / 1e6:.2f} MFLOPs", f"{row['params'] / 1e6:.3f} M parameters"]
    if row.get("latency_ms") is not None:
        parts.append(f"{row['latency_ms']:.3f} ms")
    return ", ".join(parts)


def _print_select(payload: dict[str, Any], data: Any) -> None:
    acc = f"{payload['selection_split']}_acc"
    print(
        f"{payload['model']} ({payload['method']}) on {payload['dataset']}: {payload['evaluated']}, "
        f"BN re-estimated per sub-network, in {payload['seconds']:.1f} s"
    )
    if payload["selection_split"] == "val":
        print(
            f"selection on the validation split held out of training ({data.n_val} images); "
            f"test ({data.n_test} images) reported beside it"
        )
    else:
        print(
            f"selection on the TEST split (--select-on test; {data.n_test} images): its accuracy "
            "is an optimistic estimate"
        )
    line = f"budget: {payload['budget_text']}"
    spec = payload.get("latency")
    if spec:
        line += (
            f"; latency measured on {spec['device']}, batch {spec['batch']}, {spec['threads']} "
            f"thread(s): median of {spec['repeats']} runs in {spec.get('rounds', 1)} interleaved rounds after {spec['warmup']} warm-up"
        )
    print(line)
    rows = payload["subnets"]
    pick_subnet = payload["pick"]["subnet"]

    def front_table(flag: str, cost: str, what: str) -> None:
        front = sorted((r for r in rows if r[flag]), key=lambda r: r[cost])
        timed = any(r.get("latency_ms") is not None for r in front)
        headers = ["sub-network", "MFLOPs", "M params", "val %", "test %"]
        headers += ["ms", "budget", ""] if timed else ["budget", ""]
        table = []
        for r in front:
            cells = [r["subnet"], _fmt(r["flops"] / 1e6), _fmt(r["params"] / 1e6, 3)]
            cells += [_fmt(r["val_acc"]), _fmt(r["test_acc"])]
            cells += [_fmt(r["latency_ms"], 3)] if timed else []
            marks = [
                w for w, on in (("pick", r["subnet"] == pick_subnet), ("main", r["is_main"])) if on
            ]
            table.append([*cells, "fits" if r["fits_budget"] else "", " ".join(marks)])
        among = [r for r in rows if r.get(cost) is not None]
        print(
            f"\nPareto front, {payload['selection_split']} top-1 vs {what} "
            f"({len(front)} of {len(among)}{' measured' if cost == 'latency_ms' else ''}):"
        )
        _print_table(headers, table)

    front_table("on_front", "flops", "FLOPs")
    if any(r["on_latency_front"] for r in rows):
        front_table("on_latency_front", "latency_ms", "measured latency")
    pick, main = payload["pick"], payload["main"]
    print(f"\npick: {pick['subnet']} ({_describe(pick, acc)})")
    print(f"main network {main['subnet']} (its own BN statistics): {_describe(main, acc)}")


def cmd_select(args: argparse.Namespace) -> int:
    """``nestedtrain select``: the most accurate sub-network inside a budget."""
    from .analysis.deploy import format_for, require_onnx
    from .analysis.plots import plot_pareto
    from .analysis.select import Budget, LatencySpec, select_subnet
    from .engine.checkpoint import atomic_write_text

    for flag, value in (
        ("--max-mflops", args.max_mflops),
        ("--max-params", args.max_params),
        ("--max-latency-ms", args.max_latency_ms),
    ):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} {value:g}: give a positive number (or leave it out)")
    for flag, value, least in (
        ("--latency-batch", args.latency_batch, 1),
        ("--latency-repeats", args.latency_repeats, 1),
    ):
        if value < least:
            raise ValueError(f"{flag} {value} must be >= {least}")
    budget = Budget(
        max_mflops=args.max_mflops, max_params_m=args.max_params, max_latency_ms=args.max_latency_ms
    )
    timed = args.max_latency_ms is not None or args.latency_device is not None
    latency = None
    if timed:
        latency = LatencySpec(
            device=args.latency_device or "cpu",
            batch=args.latency_batch,
            repeats=args.latency_repeats,
        )
    if args.format is not None and args.export is None:
        raise ValueError(f"--format {args.format} needs --export PATH: the file to write")
    fmt = format_for(args.export, args.format) if args.export else None
    if fmt == "onnx":
        require_onnx()  # before minutes of evaluation
    run = _open_run(args.run, args.device)
    data, cfg = run.data, run.cfg
    if data.n_val == 0 and args.select_on == "val":
        raise ValueError(
            f"{args.run} holds out no validation split (data.val_size=0), so selection would "
            "have to look at test: retrain with data.val_size > 0, or pass --select-on test to "
            "select on test anyway"
        )
    batch = _batch_size(args, cfg)
    subnets, chosen = _candidates(run.model, args)
    start = time.perf_counter()
    result = select_subnet(
        run.model,
        subnets,
        val_batches=(lambda: data.eval_batches("val", batch_size=batch)) if data.n_val else None,
        test_batches=lambda: data.eval_batches("test", batch_size=batch),
        calib_batches=lambda: data.calibration_batches(batch_size=batch),
        input_size=data.test_img_size,
        in_chans=data.in_chans,
        budget=budget,
        select_on=args.select_on,
        latency=latency,
    )
    payload = {
        "analysis": "select",
        "command": _command(args),
        "checkpoint": str(run.path),
        "model": cfg.model.name,
        "method": cfg.method,
        "epoch": run.state.get("epoch"),
        "dataset": cfg.data.name,
        "split": result["selection_split"],
        "images": {"val": data.n_val, "test": data.n_test},
        "seconds": time.perf_counter() - start,
        "evaluated": chosen["how"],
        "space": args.space,
        "space_size": chosen["space_size"],
        "sample": chosen["sample"],
        "seed": args.seed,
        "budget_text": budget.describe(),
        **result,
    }
    if args.out is not None:
        out = Path(args.out)
    else:
        out = (run.run if run.run is not None else run.path.parent) / "analysis" / "select"
    json_path, png_path = out / "select.json", out / "select.png"
    _print_select(payload, data)
    # The selection is written before the export, so a failed export does not lose it.
    atomic_write_text(json_path, json.dumps(payload, indent=2) + "\n")
    plot_pareto(payload, png_path, title=f"{cfg.model.name} ({cfg.method}) on {cfg.data.name}")
    if args.export:
        sidecar = export_files(run, result["pick"]["subnet"], args.export, fmt, batch)
        payload["export"] = {"path": str(args.export), **sidecar}
        atomic_write_text(json_path, json.dumps(payload, indent=2) + "\n")
        print()
        print_export(sidecar, args.export)
    print(f"\nwrote {json_path} and {png_path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``select`` to the CLI."""
    from .analysis.deploy import FORMATS

    p = subparsers.add_parser(
        "select",
        help="pick the most accurate sub-network under a FLOPs, parameter or latency budget",
        description="Evaluate the sub-networks of a run (BN re-estimated for each), choose on "
        "the validation split, print the Pareto front of accuracy against FLOPs (and measured "
        "latency) and the pick, write RUN/analysis/select/select.json and select.png. A budget "
        "nothing meets is one line naming the smallest sub-network's cost, exit status 2.",
    )
    p.add_argument("run", metavar="RUN", help="a run folder or a checkpoint .pt")
    p.add_argument("--max-mflops", type=float, metavar="X", help="forward MFLOPs per image")
    p.add_argument("--max-params", type=float, metavar="M", help="millions of parameters")
    p.add_argument(
        "--max-latency-ms",
        type=float,
        metavar="T",
        help="median latency in ms, measured on --latency-device at --latency-batch",
    )
    p.add_argument(
        "--latency-device",
        metavar="DEV",
        help="measure latency here: cpu or cuda[:N] (default cpu when --max-latency-ms is given; "
        "giving it alone measures without a latency budget)",
    )
    p.add_argument("--latency-batch", type=int, default=1, metavar="B", help="default 1")
    p.add_argument(
        "--latency-repeats", type=int, default=30, metavar="N", help="timed runs (default 30)"
    )
    p.add_argument(
        "--space",
        default="full",
        help="full (default: every ordered sub-network), space3, or most blocks each stage may "
        "drop: N or 0,1,3,0",
    )
    p.add_argument(
        "--max-evaluated",
        type=int,
        default=1000,
        metavar="N",
        help="a larger space is sampled: N sub-networks, seeded (default 1000)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    p.add_argument(
        "--select-on",
        choices=("val", "test"),
        default="val",
        help="val (default); test only when the run has no validation split, explicitly",
    )
    p.add_argument("--export", metavar="PATH", help="deploy the pick to this file (+ PATH.json)")
    p.add_argument("--format", choices=FORMATS, help="of --export (default: from the suffix)")
    p.add_argument("--device", default="auto", help="evaluation device: auto, cpu, cuda, cuda:N")
    p.add_argument(
        "--batch-size", type=int, metavar="N", help="evaluation batch (default: the run's)"
    )
    p.add_argument("--out", metavar="DIR", help="write here instead of RUN/analysis/select/")
    p.set_defaults(handler=cmd_select)
