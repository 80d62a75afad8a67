"""``nestedtrain latency-kit``: the files to time on the device a model will be served on.

``latency-kit RUN --out KIT/`` (or ``--model NAME --weights FILE --data ...`` for a model
trained elsewhere, opened as the analyses open it) evaluates the run's sub-networks as ``select`` does (BN
re-estimated for each, on the validation split), takes the accuracy-vs-FLOPs Pareto front
within the optional FLOPs/parameter budget, adds the main network, the sub-networks that
determine the additive latency model and a seeded spread of held-out others, and writes them
with :func:`nestedtrain.analysis.latency.write_latency_kit`: ONNX files, ``manifest.json`` and
``measure.py``. On the device, ``python measure.py --out latency.json`` times them;
``nestedtrain select RUN --latency-table latency.json`` reads the result.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from ..analysis.latency import check_kit_folder, kit_subnets, write_latency_kit
from ..analysis.select import Budget, pareto_front
from ..deploy import require_onnx
from ..distributed import pick_device
from ..elastic import Subnet
from ..errors import ConfigError
from .common import (
    add_command,
    batch_size,
    checkpoint_data,
    command_line,
)
from .deploy import add_candidate_options, candidate_subnets, select_candidates
from .opening import add_model_options, open_target

__all__ = ["register"]


def _front_in_budget(result: dict[str, Any], budget: Budget) -> list[str]:
    """The accuracy-vs-FLOPs Pareto front of the sub-networks inside ``budget``."""
    acc = f"{result['selection_split']}_acc"
    inside = [r for r in result["subnets"] if budget.fits_cost(r)]
    return [inside[i]["subnet"] for i in pareto_front(inside, "flops", acc)]


def _check_options(args: argparse.Namespace) -> None:
    for flag, value in (("--max-mflops", args.max_mflops), ("--max-params", args.max_params)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag} {value:g}: give a positive number (or leave it out)")
    for flag, value in (("--held-out", args.held_out), ("--fit", args.fit)):
        if value < 0:
            raise ConfigError(f"{flag} {value} must be >= 0")


def cmd_latency_kit(args: argparse.Namespace) -> int:
    """``nestedtrain latency-kit``: a folder of ONNX files, a manifest and ``measure.py``."""
    _check_options(args)
    budget = Budget(max_mflops=args.max_mflops, max_params_m=args.max_params)
    require_onnx()  # before minutes of evaluation
    check_kit_folder(args.out)
    device = pick_device(args.device)
    ckpt = open_target(args, device, "run")
    data, cfg = checkpoint_data(ckpt, device), ckpt.cfg
    if data.n_val == 0 and args.select_on == "val":
        raise ConfigError(
            f"{args.run or args.data} holds out no validation split (data.val_size=0): pass --select-on test "
            "to choose the Pareto front on test"
        )
    batch = batch_size(args.batch_size, cfg)
    pool, chosen = candidate_subnets(ckpt.model, args)
    result = select_candidates(ckpt, data, pool, budget, args, batch)
    front = [Subnet.parse(ckpt.model, s) for s in _front_in_budget(result, budget)]
    subnets = kit_subnets(
        ckpt.model, front, pool, held_out=args.held_out, seed=args.seed, fit=args.fit
    )
    source = {
        "command": command_line(args),
        "checkpoint": str(ckpt.path),
        "evaluated": chosen["how"],
        "front_on": f"{args.select_on} top-1 vs FLOPs, budget {budget.describe()}",
    }
    manifest = write_latency_kit(
        ckpt.model,
        subnets,
        args.out,
        model_name=cfg.model.name,
        input_size=data.test_img_size,
        in_chans=data.in_chans,
        source=source,
    )
    _print_kit(manifest, args.out)
    return 0


def _print_kit(manifest: dict[str, Any], out: str) -> None:
    roles = manifest["roles"]
    shape = "x".join(str(n) for n in manifest["input_shape"][1:])
    print(
        f"wrote {len(manifest['files'])} ONNX files of {manifest['model']['name']} ({shape} "
        f"input) to {out}: {roles['front']} on the Pareto front, the main network, "
        f"{roles['fit']} more to fit the per-stage costs on, {roles['held_out']} held out to check "
        "the predictor; manifest.json lists each with its FLOPs, parameters and sha256"
    )
    print(
        f"on the device (Python 3, numpy, onnxruntime): cd {out} && python measure.py --out "
        "latency.json [--threads N] [--batch 1] [--providers CPUExecutionProvider]"
    )
    print("then: nestedtrain select RUN --latency-table latency.json [--max-latency-ms T]")


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run", metavar="RUN", nargs="?", help="a run folder or a checkpoint .pt (or --model)"
    )
    add_model_options(parser, data=True)
    parser.add_argument("--out", required=True, metavar="KIT", help="a new folder for the kit")
    parser.add_argument("--max-mflops", type=float, metavar="X", help="front within X MFLOPs")
    parser.add_argument("--max-params", type=float, metavar="M", help="front within M M params")
    parser.add_argument(
        "--held-out",
        type=int,
        default=8,
        metavar="N",
        help="other sub-networks, drawn seeded, to measure the predictor's error on (default 8)",
    )
    parser.add_argument(
        "--fit",
        type=int,
        default=8,
        metavar="N",
        help="other sub-networks, drawn seeded, to fit the predictor on, besides the front, the "
        "main network and one per stage (default 8)",
    )
    add_candidate_options(
        parser, "the split of the Pareto front: val (default); test only explicitly"
    )
    parser.add_argument("--device", default="auto", help="evaluation device: auto, cpu, cuda")
    parser.add_argument(
        "--batch-size", type=int, metavar="N", help="evaluation batch (default: the run's)"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``latency-kit``."""
    _options(
        add_command(
            subparsers,
            "latency-kit",
            cmd_latency_kit,
            help="ONNX files of a run's sub-networks and measure.py, to time them on the device",
            description="Write KIT/: the run's accuracy-vs-FLOPs Pareto front (within the "
            "budget), the main network and a seeded spread of other sub-networks as ONNX files, "
            "manifest.json (sub-network, FLOPs, parameters, input shape, file, sha256) and "
            "measure.py, which needs only Python 3, numpy and onnxruntime. On the device: "
            "python measure.py --out latency.json; then nestedtrain select RUN --latency-table "
            "latency.json.",
        )
    )
