"""``nestedtrain export`` and ``nestedtrain select``: cash in the sub-networks.

- ``export CHECKPOINT --subnet 3-2-4 --out PATH``: a state_dict, TorchScript or ONNX file of a
  sub-network with its JSON sidecar (:func:`nestedtrain.deploy.deploy_subnet`).
- ``select RUN --max-mflops X --max-params M --max-latency-ms T``: evaluate the sub-networks
  of a run (BN re-estimated for each, shared prefixes), choose on the validation split, print
  the Pareto front and the pick, write ``RUN/analysis/select/select.json`` and
  ``select.png``, and with ``--export PATH`` deploy the pick.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..analysis.latency import (
    LatencyTable,
    describe_latency,
    describe_predictor,
    model_identity,
    read_latency_table,
)
from ..analysis.plots import plot_pareto
from ..analysis.select import Budget, LatencySpec, select_subnet
from ..atomic import atomic_write_text
from ..data import Data
from ..deploy import FORMATS, deploy_subnet, format_for, require_onnx, sidecar_path
from ..distributed import pick_device
from ..elastic import OrderedSampler, Subnet
from ..elastic.sampling import space_subnets
from ..errors import ConfigError
from ..version import __version__
from .common import (
    Checkpoint,
    add_command,
    add_seed_option,
    batch_size,
    checkpoint_data,
    command_line,
    fmt,
    output_folder,
    parse_space,
    table,
)
from .opening import add_model_options, open_target

__all__ = ["candidate_subnets", "register", "select_candidates"]


# --------------------------------------------------------------------------------- export
def _model_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The keyword arguments the run's model was built with (see ``build_model``)."""
    kwargs = dict(OmegaConf.to_container(cfg.model.kwargs, resolve=True))
    if cfg.model.drop_rate:
        kwargs["drop_rate"] = cfg.model.drop_rate
    if cfg.model.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.model.drop_path_rate
    return kwargs


def _preprocess(data: Data) -> str:
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


def _meta(ckpt: Checkpoint, data: Data) -> dict[str, Any]:
    return {
        "source_run": str(ckpt.run) if ckpt.run is not None and not ckpt.foreign else None,
        "checkpoint": str(ckpt.path),
        "epoch": ckpt.state.get("epoch"),
        "method": ckpt.cfg.method,
        "dataset": ckpt.cfg.data.name,
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


def _export(
    ckpt: Checkpoint,
    data: Data,
    subnet: Subnet | str,
    out: str | Path,
    fmt_name: str | None,
    batch: int,
    recalibrate: bool = True,
) -> dict[str, Any]:
    """Deploy ``subnet`` of a checkpoint to ``out`` (+ sidecar); returns the sidecar."""
    splits = ("val", "test") if data.n_val > 0 else ("test",)
    evals = {s: (lambda s=s: data.eval_batches(s, batch_size=batch)) for s in splits}
    check_images = next(iter(data.eval_batches("test", batch_size=64)))[0]
    return deploy_subnet(
        ckpt.model,
        subnet,
        out,
        fmt_name,
        input_size=data.test_img_size,
        in_chans=data.in_chans,
        num_classes=data.num_classes,
        model_name=ckpt.cfg.model.name,
        model_kwargs=_model_kwargs(ckpt.cfg),
        calib_batches=(lambda: data.calibration_batches(batch_size=batch)) if recalibrate else None,
        eval_batches=evals,
        check_images=check_images,
        meta=_meta(ckpt, data),
    )


def _print_export(sidecar: dict[str, Any], out: str | Path) -> None:
    """What an export wrote, its accuracy and cost, the ONNX checks, and how to load it."""
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
    if args.torchscript and args.format not in (None, "torchscript"):
        raise ConfigError(f"--torchscript and --format {args.format} disagree: give one of them")
    fmt_name = format_for(args.out, "torchscript" if args.torchscript else args.format)
    if fmt_name == "onnx":
        require_onnx()
    device = pick_device(args.device)
    ckpt = open_target(args, device, "checkpoint")
    data = checkpoint_data(ckpt, device)
    subnet = Subnet.parse(ckpt.model, args.subnet)
    batch = batch_size(args.batch_size, ckpt.cfg)
    recalibrate = args.bn == "recalibrate"
    sidecar = _export(ckpt, data, subnet, args.out, fmt_name, batch, recalibrate=recalibrate)
    _print_export(sidecar, args.out)
    return 0


# --------------------------------------------------------------------------------- select
def _check_select_options(args: argparse.Namespace) -> None:
    for flag, value in (
        ("--max-mflops", args.max_mflops),
        ("--max-params", args.max_params),
        ("--max-latency-ms", args.max_latency_ms),
    ):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag} {value:g}: give a positive number (or leave it out)")
    for flag, value, least in (
        ("--latency-batch", args.latency_batch, 1),
        ("--latency-repeats", args.latency_repeats, 1),
    ):
        if value < least:
            raise ConfigError(f"{flag} {value} must be >= {least}")
    if args.format is not None and args.export is None:
        raise ConfigError(f"--format {args.format} needs --export PATH: the file to write")
    if not (math.isfinite(args.max_prediction_error) and args.max_prediction_error > 0):
        raise ConfigError(
            f"--max-prediction-error {args.max_prediction_error:g}: give a percentage > 0, e.g. 20"
        )
    if args.latency_table is not None and args.latency_device is not None:
        raise ConfigError(
            f"--latency-table {args.latency_table} and --latency-device {args.latency_device}: "
            "the table's latencies were measured on its device; give one of them"
        )


def _latency(args: argparse.Namespace) -> LatencySpec | None:
    """How to measure latency: asked for by a latency budget or a latency device."""
    if args.latency_table is not None:
        return None  # the table's, not measured here
    if args.max_latency_ms is None and args.latency_device is None:
        return None
    return LatencySpec(
        device=args.latency_device or "cpu", batch=args.latency_batch, repeats=args.latency_repeats
    )


def candidate_subnets(model: Any, args: argparse.Namespace) -> tuple[list[Any], dict[str, Any]]:
    """The sub-networks to evaluate (``args``: ``space``, ``max_evaluated``, ``seed``), and how
    they were chosen."""
    if args.max_evaluated < 1:
        raise ConfigError(f"--max-evaluated {args.max_evaluated} must be >= 1")
    space = parse_space(args.space)
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


def select_candidates(
    ckpt: Checkpoint,
    data: Data,
    subnets: list[Any],
    budget: Budget,
    args: argparse.Namespace,
    batch: int,
    **latency: Any,
) -> dict[str, Any]:
    """:func:`~nestedtrain.analysis.select.select_subnet` over ``subnets`` on ``data``, by
    ``args.select_on`` (validation where the data holds it out), in batches of ``batch``;
    ``latency``: its ``latency`` and ``latency_table``."""
    return select_subnet(
        ckpt.model,
        subnets,
        val_batches=(lambda: data.eval_batches("val", batch_size=batch)) if data.n_val else None,
        test_batches=lambda: data.eval_batches("test", batch_size=batch),
        calib_batches=lambda: data.calibration_batches(batch_size=batch),
        input_size=data.test_img_size,
        in_chans=data.in_chans,
        budget=budget,
        select_on=args.select_on,
        **latency,
    )


def _describe(row: dict[str, Any], acc: str) -> str:
    parts = [f"{acc.split('_')[0]} {row[acc]:.2f}%"]
    other = "test_acc" if acc == "val_acc" else "val_acc"
    if row.get(other) is not None:
        parts.append(f"{other.split('_')[0]} {row[other]:.2f}%")
    parts += [f"{row['flops'] / 1e6:.2f} MFLOPs", f"{row['params'] / 1e6:.3f} M parameters"]
    if row.get("latency_ms") is not None:
        source = row.get("latency_source")
        parts.append(f"{row['latency_ms']:.3f} ms" + (f" ({source})" if source else ""))
    return ", ".join(parts)


def _print_front(payload: dict[str, Any], flag: str, cost: str, what: str) -> None:
    """The Pareto front of accuracy against ``cost``: its sub-networks, cheapest first."""
    rows = payload["subnets"]
    pick_subnet = payload["pick"]["subnet"]
    front = sorted((r for r in rows if r[flag]), key=lambda r: r[cost])
    timed = any(r.get("latency_ms") is not None for r in front)
    tabled = (payload.get("latency") or {}).get("source") == "table"
    header = ["sub-network", "MFLOPs", "M params", "val %", "test %"]
    header += (["ms", "from"] if tabled else ["ms"]) if timed else []
    header += ["budget", ""]
    cells = []
    for r in front:
        row = [r["subnet"], fmt(r["flops"] / 1e6), fmt(r["params"] / 1e6, 3)]
        row += [fmt(r["val_acc"]), fmt(r["test_acc"])]
        row += [fmt(r["latency_ms"], 3)] if timed else []
        row += [r.get("latency_source") or "-"] if timed and tabled else []
        marks = [
            w for w, on in (("pick", r["subnet"] == pick_subnet), ("main", r["is_main"])) if on
        ]
        cells.append([*row, "fits" if r["fits_budget"] else "", " ".join(marks)])
    among = [r for r in rows if r.get(cost) is not None]
    print(
        f"\nPareto front, {payload['selection_split']} top-1 vs {what} "
        f"({len(front)} of {len(among)}{' with a latency' if cost == 'latency_ms' else ''}):"
    )
    print(table(header, cells))


def _print_select(payload: dict[str, Any], data: Data) -> None:
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
        line += f"; {describe_latency(spec)}"
    print(line)
    if spec and (predictor := describe_predictor(spec)):
        print(predictor)
    _print_front(payload, "on_front", "flops", "FLOPs")
    if any(r["on_latency_front"] for r in payload["subnets"]):
        what = "device latency" if spec.get("source") == "table" else "measured latency"
        _print_front(payload, "on_latency_front", "latency_ms", what)
    pick, main = payload["pick"], payload["main"]
    print(f"\npick: {pick['subnet']} ({_describe(pick, acc)})")
    print(f"main network {main['subnet']} (its own BN statistics): {_describe(main, acc)}")


def cmd_select(args: argparse.Namespace) -> int:
    """``nestedtrain select``: the most accurate sub-network inside a budget."""
    _check_select_options(args)
    budget = Budget(
        max_mflops=args.max_mflops, max_params_m=args.max_params, max_latency_ms=args.max_latency_ms
    )
    latency = _latency(args)
    fmt_name = format_for(args.export, args.format) if args.export else None
    if fmt_name == "onnx":
        require_onnx()  # before minutes of evaluation
    device = pick_device(args.device)
    ckpt = open_target(args, device, "run", args.out)
    data, cfg = checkpoint_data(ckpt, device), ckpt.cfg
    if data.n_val == 0 and args.select_on == "val":
        raise ConfigError(
            f"{ckpt.path} holds out no validation split (data.val_size=0), so selection would "
            "have to look at test: retrain with data.val_size > 0, or pass --select-on test to "
            "select on test anyway"
        )
    batch = batch_size(args.batch_size, cfg)
    subnets, chosen = candidate_subnets(ckpt.model, args)
    table = _latency_table(args, ckpt, data)
    start = time.perf_counter()
    result = select_candidates(
        ckpt, data, subnets, budget, args, batch, latency=latency, latency_table=table
    )
    seconds = time.perf_counter() - start
    payload = _select_payload(args, ckpt, data, chosen, budget, seconds, result)
    out = output_folder(args.out, ckpt, "select")
    json_path, png_path = out / "select.json", out / "select.png"
    _print_select(payload, data)
    # The selection is written before the export, so a failed export does not lose it.
    atomic_write_text(json_path, json.dumps(payload, indent=2) + "\n")
    plot_pareto(payload, png_path, title=f"{cfg.model.name} ({cfg.method}) on {cfg.data.name}")
    if args.export:
        sidecar = _export(ckpt, data, result["pick"]["subnet"], args.export, fmt_name, batch)
        payload["export"] = {"path": str(args.export), **sidecar}
        atomic_write_text(json_path, json.dumps(payload, indent=2) + "\n")
        print()
        _print_export(sidecar, args.export)
    print(f"\nwrote {json_path} and {png_path}")
    return 0


def _latency_table(args: argparse.Namespace, ckpt: Checkpoint, data: Data) -> LatencyTable | None:
    """``--latency-table``, read for this run's architecture and input shape."""
    if args.latency_table is None:
        return None
    identity = model_identity(ckpt.model, ckpt.cfg.model.name, data.in_chans, data.test_img_size)
    table = read_latency_table(args.latency_table, identity, args.max_prediction_error / 100)
    if args.latency_batch not in (1, table.table["batch"]):  # 1: the default, not asked for
        raise ConfigError(
            f"--latency-batch {args.latency_batch}: {args.latency_table} was measured at batch "
            f"{table.table['batch']}; run the kit's measure.py with --batch {args.latency_batch}"
        )
    return table


def _select_payload(
    args: argparse.Namespace,
    ckpt: Checkpoint,
    data: Data,
    chosen: dict[str, Any],
    budget: Budget,
    seconds: float,
    result: dict[str, Any],
) -> dict[str, Any]:
    """``select.json``: the command, the checkpoint, the data, how the candidates were
    ``chosen`` (:func:`candidate_subnets`), the budget, then :func:`select_subnet`'s ``result``."""
    cfg = ckpt.cfg
    return {
        "analysis": "select",
        "command": command_line(args),
        "checkpoint": str(ckpt.path),
        "model": cfg.model.name,
        "method": cfg.method,
        "epoch": ckpt.state.get("epoch"),
        "dataset": cfg.data.name,
        "split": result["selection_split"],
        "images": {"val": data.n_val, "test": data.n_test},
        "seconds": seconds,
        "evaluated": chosen["how"],
        "space": args.space,
        "space_size": chosen["space_size"],
        "sample": chosen["sample"],
        "seed": args.seed,
        "budget_text": budget.describe(),
        **result,
    }


# --------------------------------------------------------------------------------- parser
def _export_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", nargs="?", help="a run folder or a checkpoint .pt")
    add_model_options(parser, data=True)
    parser.add_argument("--subnet", required=True, help="e.g. 3-2-4")
    parser.add_argument("--out", required=True, help="output file")
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


def _budget_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-mflops", type=float, metavar="X", help="forward MFLOPs per image")
    parser.add_argument("--max-params", type=float, metavar="M", help="millions of parameters")
    parser.add_argument(
        "--max-latency-ms",
        type=float,
        metavar="T",
        help="median latency in ms, measured on --latency-device at --latency-batch",
    )
    parser.add_argument(
        "--latency-device",
        metavar="DEV",
        help="measure latency here: cpu or cuda[:N] (default cpu when --max-latency-ms is given; "
        "giving it alone measures without a latency budget)",
    )
    parser.add_argument("--latency-batch", type=int, default=1, metavar="B", help="default 1")
    parser.add_argument(
        "--latency-repeats", type=int, default=30, metavar="N", help="timed runs (default 30)"
    )
    parser.add_argument(
        "--latency-table",
        metavar="JSON",
        help="latencies measured on the serving device: the latency.json that the measure.py of "
        "a kit (nestedtrain latency-kit) wrote; refused for another architecture or input shape",
    )
    parser.add_argument(
        "--max-prediction-error",
        type=float,
        default=20.0,
        metavar="PCT",
        help="with --latency-table: predict the latency of sub-networks it did not measure only "
        "if the additive model's worst held-out error is at most PCT %% (default 20)",
    )


def add_candidate_options(parser: argparse.ArgumentParser, select_on_help: str) -> None:
    """``--space``, ``--max-evaluated``, ``--seed`` (what :func:`candidate_subnets` reads)
    and ``--select-on``: the sub-networks a command evaluates and the split it ranks them on."""
    parser.add_argument(
        "--space",
        default="full",
        help="full (default: every ordered sub-network), space3, or most blocks each stage may "
        "drop: N or 0,1,3,0",
    )
    add_seed_option(parser, "the sample")
    parser.add_argument(
        "--max-evaluated",
        type=int,
        default=1000,
        metavar="N",
        help="a larger space is sampled: N sub-networks, seeded (default 1000)",
    )
    parser.add_argument("--select-on", choices=("val", "test"), default="val", help=select_on_help)


def _select_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", nargs="?", help="a run folder or a checkpoint .pt")
    add_model_options(parser, data=True)
    _budget_options(parser)
    add_candidate_options(
        parser, "val (default); test only when the run has no validation split, explicitly"
    )
    parser.add_argument(
        "--export", metavar="PATH", help="deploy the pick to this file (+ PATH.json)"
    )
    parser.add_argument("--format", choices=FORMATS, help="of --export (default: from the suffix)")
    parser.add_argument(
        "--device", default="auto", help="evaluation device: auto, cpu, cuda, cuda:N"
    )
    parser.add_argument(
        "--batch-size", type=int, metavar="N", help="evaluation batch (default: the run's)"
    )
    parser.add_argument("--out", metavar="DIR", help="write here instead of RUN/analysis/select/")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``export`` and ``select``."""
    _export_options(
        add_command(
            subparsers,
            "export",
            cmd_export,
            help="cut a sub-network out as a state_dict, TorchScript or ONNX file",
            description="Write a sub-network (BN statistics re-estimated for it) as a plain "
            "state_dict, TorchScript or ONNX file, and OUT.json beside it: source run, "
            "sub-network, input size and normalisation, classes, accuracy, FLOPs, parameters, "
            "how to load it.",
        )
    )
    _select_options(
        add_command(
            subparsers,
            "select",
            cmd_select,
            help="pick the most accurate sub-network under a FLOPs, parameter or latency budget",
            description="Evaluate the sub-networks of a run (BN re-estimated for each), choose "
            "on the validation split, print the Pareto front of accuracy against FLOPs (and "
            "measured latency) and the pick, write RUN/analysis/select/select.json and "
            "select.png. A budget nothing meets is one line naming the smallest sub-network's "
            "cost, exit status 2.",
        )
    )
