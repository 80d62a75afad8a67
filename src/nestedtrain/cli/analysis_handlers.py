"""What ``nestedtrain analyze ...`` and ``nestedtrain report`` do (:mod:`.analyze` declares
their arguments): open the checkpoints and data an analysis reads, run it, print a short table
and write JSON and PNG into ``RUN/analysis/<what>/`` when the checkpoint lives in a run folder
(or ``--out DIR``). Each JSON records the command that made it
(:func:`~nestedtrain.cli.common.command_line`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from ..analysis.destruct import destruct
from ..analysis.erf import effective_receptive_field, erf_area_ratios
from ..analysis.kl_drift import kl_drift_summary
from ..analysis.lesion import lesion
from ..analysis.logits import logit_norms
from ..analysis.matrix import loafing_matrix
from ..analysis.plots import (
    plot_destruction,
    plot_erf,
    plot_kl_drift,
    plot_lesion,
    plot_loafing_matrix,
    plot_logit_norms,
    plot_subnet_accuracy,
)
from ..analysis.report import write_report
from ..analysis.subnets import evaluate_space
from ..atomic import atomic_write_text
from ..data import Data
from ..distributed import pick_device
from ..elastic.subnet import Subnet
from ..errors import ConfigError
from ..records import read_kl_drift
from .common import (
    Checkpoint,
    batch_size,
    checkpoint_data,
    command_line,
    open_checkpoint,
    output_folder,
    parse_ints,
    parse_space,
    table,
)
from .opening import open_foreign, open_target

__all__ = [
    "cmd_destruct",
    "cmd_erf",
    "cmd_kl_drift",
    "cmd_lesion",
    "cmd_logits",
    "cmd_matrix",
    "cmd_report",
    "cmd_subnets",
]


# --------------------------------------------------------------------- loading, writing
def _data(ckpt: Checkpoint, args: argparse.Namespace, device: torch.device) -> Data:
    name, root = args.data, args.data_root
    if name is not None and name.startswith("imagefolder:"):
        name, root = "imagefolder", name[len("imagefolder:") :]
    return checkpoint_data(ckpt, device, name=name, root=root)


def _open(args: argparse.Namespace, device: torch.device) -> tuple[Checkpoint, Data]:
    """CHECKPOINT, or the model of --model (with --weights or --pretrained, and --data), and
    the data it is analysed on."""
    ckpt = open_target(args, device, "checkpoint", args.out)
    return ckpt, _data(ckpt, args, device)


def _eval_fn(data: Data, args: argparse.Namespace, cfg: DictConfig) -> Callable[[], Iterable]:
    size = batch_size(args.batch_size, cfg)
    return lambda: data.eval_batches(args.split, batch_size=size)


def _calib_fn(data: Data, args: argparse.Namespace, cfg: DictConfig) -> Callable[[], Iterable]:
    size = batch_size(args.batch_size, cfg)
    if args.calib_images is not None and args.calib_images < 1:
        raise ConfigError(f"--calib-images {args.calib_images} must be >= 1")
    return lambda: data.calibration_batches(num_images=args.calib_images, batch_size=size)


def _same_task(first: Checkpoint, other: Checkpoint) -> None:
    mine = (first.state["num_classes"], first.state["in_chans"])
    theirs = (other.state["num_classes"], other.state["in_chans"])
    if mine != theirs:
        raise ConfigError(
            f"{other.path} predicts {theirs[0]} classes from {theirs[1]} channels but "
            f"{first.path} {mine[0]} from {mine[1]}: compare models trained on one dataset"
        )


def _open_all(args: argparse.Namespace, device: torch.device) -> list[Checkpoint]:
    """Models to compare: the one of --model first (its folder and data are the analysis's),
    then the CHECKPOINTs; all trained for the first one's task."""
    opened = [open_foreign(args, device, args.out)] if args.model else []
    opened += [open_checkpoint(path, device) for path in args.checkpoints]
    if not opened:
        raise ConfigError("give one or more CHECKPOINTs, or --model NAME with its --weights")
    for other in opened[1:]:
        _same_task(opened[0], other)
    return opened


def _labels(opened: Sequence[Checkpoint]) -> list[str]:
    labels = [f"{x.cfg.model.name} {x.cfg.method}" for x in opened]
    if len(set(labels)) < len(labels):
        labels = [
            f"{label} ({x.run.name if x.run else x.path.stem})" for label, x in zip(labels, opened)
        ]
    if len(set(labels)) < len(labels):
        labels = [f"{label} #{i + 1}" for i, label in enumerate(labels)]
    return labels


def _header(
    analysis: str, args: argparse.Namespace, ckpt: Checkpoint, seconds: float
) -> dict[str, Any]:
    return {
        "analysis": analysis,
        "command": command_line(args),
        "checkpoint": str(ckpt.path),
        "weights": "foreign" if ckpt.foreign else "nestedtrain",
        "model": ckpt.cfg.model.name,
        "method": ckpt.cfg.method,
        "epoch": ckpt.state.get("epoch"),
        "dataset": ckpt.cfg.data.name if ckpt.foreign else args.data or ckpt.cfg.data.name,
        "split": args.split,
        "seconds": seconds,
    }


def _save(
    out: Path, stem: str, payload: dict[str, Any], plot: Callable[[Path], object]
) -> tuple[Path, Path]:
    """Write ``payload`` as ``out/stem.json`` and the figure ``plot(path)`` draws as
    ``out/stem.png``; return both paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"{stem}.json", out / f"{stem}.png"
    atomic_write_text(json_path, json.dumps(payload, indent=2) + "\n")
    plot(png_path)
    return json_path, png_path


def _swaps(texts: Sequence[str] | None) -> list[tuple[int, int, int]]:
    swaps = []
    for text in texts or []:
        try:
            stage, first, second = (int(p) for p in text.split(":"))
        except ValueError:
            raise ConfigError(
                f"--swap {text!r}: write STAGE:BLOCK:BLOCK, e.g. 1:0:2 swaps blocks 0 and 2 of "
                "stage 1 (stages from 1, blocks from 0)"
            ) from None
        swaps.append((stage, first, second))
    return swaps


# ------------------------------------------------------------------------------ handlers
def cmd_subnets(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    ckpt, data = _open(args, device)
    individual = []
    for path in args.individual or []:
        other = open_checkpoint(path, device)
        _same_task(ckpt, other)
        individual.append((f"{other.cfg.model.name} ({other.path})", other.model))
    start = time.perf_counter()
    result = evaluate_space(
        ckpt.model,
        _eval_fn(data, args, ckpt.cfg),
        _calib_fn(data, args, ckpt.cfg),
        space=parse_space(args.space),
        sample=args.sample,
        seed=args.seed,
        individual=individual,
        chunk_images=args.chunk_images,
        memory_mb=args.memory_mb,
    )
    payload = {**_header("subnets", args, ckpt, time.perf_counter() - start), **result}
    out = output_folder(args.out, ckpt, "subnets")
    json_path, png_path = _save(out, "subnets", payload, partial(plot_subnet_accuracy, result))
    _print_subnets(result, ckpt, args.space, payload["seconds"])
    print(f"\nwrote {json_path} and {png_path}")
    return 0


def _print_subnets(result: dict[str, Any], ckpt: Checkpoint, space: str, seconds: float) -> None:
    stats = result["stats"]
    print(
        f"{stats['count']} of {result['space_size']} sub-networks of {ckpt.cfg.model.name} "
        f"(space {space}), BN re-calibrated, in {seconds:.1f} s; main network "
        f"{result['main']['acc']:.2f}%"
    )
    print(
        table(
            ["", "max", "mean", "std", "min"],
            [["top-1 (%)", stats["max"], stats["mean"], stats["std"], stats["min"]]],
        )
    )
    rows = sorted((r for r in result["subnets"] if r["in_space"]), key=lambda r: r["acc"])
    shown = rows if len(rows) <= 12 else rows[:6] + rows[-6:]
    print()
    print(
        table(
            ["sub-network", "blocks", "top-1 (%)"],
            [[r["subnet"], r["blocks"], r["acc"]] for r in shown],
        )
    )
    if result["individual"]:
        print()
        print(
            table(
                ["individual model", "sub-network", "alone (%)", "inside (%)"],
                [
                    [r["label"], r["subnet"], r["acc"], r["acc_inside"]]
                    for r in result["individual"]
                ],
            )
        )


def cmd_matrix(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    opened = _open_all(args, device)
    data = _data(opened[0], args, device)
    names = _labels(opened)
    start = time.perf_counter()
    result = loafing_matrix(
        [x.model for x in opened],
        names,
        _eval_fn(data, args, opened[0].cfg),
        _calib_fn(data, args, opened[0].cfg),
        architectures=[x.cfg.model.name for x in opened],
        chunk_images=args.chunk_images,
        memory_mb=args.memory_mb,
    )
    header = _header("matrix", args, opened[0], time.perf_counter() - start)
    header["checkpoints"] = [str(x.path) for x in opened]
    out = output_folder(args.out, opened[0], "matrix")
    payload = {**header, **result}
    json_path, png_path = _save(out, "matrix", payload, partial(plot_loafing_matrix, result))
    print("top-1 (%): rows are trained models, columns architectures run inside them")
    print(
        table(
            ["trained model", *result["architectures"]],
            [[n, *row] for n, row in zip(names, result["acc"])],
        )
    )
    print(f"\nwrote {json_path} and {png_path}")
    return 0


def cmd_destruct(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    delete_k = parse_ints(args.k, "--k")
    permute_k = (
        parse_ints(args.permute_k, "--permute-k") if args.permute_k is not None else delete_k
    )
    if args.max_combinations < 0:
        raise ConfigError(f"--max-combinations {args.max_combinations} must be >= 1, or 0 for all")
    ckpt, data = _open(args, device)
    start = time.perf_counter()
    result = destruct(
        ckpt.model,
        _eval_fn(data, args, ckpt.cfg),
        _calib_fn(data, args, ckpt.cfg) if args.bn == "recalibrate" else None,
        delete_k=delete_k,
        permute_k=permute_k,
        max_combinations=None if args.max_combinations == 0 else args.max_combinations,
        seed=args.seed,
        bn=args.bn,
        stages=parse_ints(args.stages, "--stages"),
        swaps=_swaps(args.swap),
        chunk_images=args.chunk_images,
        memory_mb=args.memory_mb,
    )
    payload = {**_header("destruct", args, ckpt, time.perf_counter() - start), **result}
    out = output_folder(args.out, ckpt, "destruct")
    json_path, png_path = _save(out, "destruct", payload, partial(plot_destruction, result))
    _print_destruct(result, ckpt)
    print(f"\nwrote {json_path} and {png_path}")
    return 0


def _print_destruct(result: dict[str, Any], ckpt: Checkpoint) -> None:
    print(f"intact {ckpt.cfg.model.name}: {result['intact']['acc']:.2f}% (BN {result['bn']})")
    print("\ndeleting one block: drop in points")
    print(
        table(
            ["block", "stage", "in stage", "top-1 (%)", "drop"],
            [
                [r["index"], r["stage"], r["block"], r["acc"], r["drop"]]
                for r in result["delete_one"]
            ],
        )
    )
    for key, what in (
        ("delete", "deleting k blocks"),
        ("permute", "permuting by k transpositions"),
    ):
        if result[key]:
            print(f"\n{what}: drop in points")
            print(
                table(
                    ["k", "combinations", "evaluated", "max", "mean", "min"],
                    [
                        [
                            g["k"],
                            g["total"],
                            g["evaluated"],
                            *(g["stats"][s] for s in ("max", "mean", "min")),
                        ]
                        for g in result[key]
                    ],
                )
            )
    if result["swaps"]:
        print()
        print(
            table(
                ["swap", "sub-network", "top-1 (%)", "drop"],
                [[r["swap"], r["subnet"], r["acc"], r["drop"]] for r in result["swaps"]],
            )
        )


def cmd_lesion(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    policies = [p for p in args.bn.split(",") if p]
    ks = None if args.k == "all" else parse_ints(args.k, "--k")
    ckpt, data = _open(args, device)
    start = time.perf_counter()
    result = lesion(
        ckpt.model,
        _eval_fn(data, args, ckpt.cfg),
        _calib_fn(data, args, ckpt.cfg) if "recalibrate" in policies else None,
        ks=ks,
        random_draws=args.random,
        seed=args.seed,
        bn=policies,
        norm_images=args.norm_images,
        chunk_images=args.chunk_images,
        memory_mb=args.memory_mb,
    )
    payload = {**_header("lesion", args, ckpt, time.perf_counter() - start), **result}
    out = output_folder(args.out, ckpt, "lesion")
    title = f"{ckpt.cfg.model.name} ({ckpt.path}) on {ckpt.cfg.data.name} {args.split}"
    plot = partial(plot_lesion, result, title=title)
    json_path, png_path = _save(out, "lesion", payload, plot)
    _print_lesion(result, title, payload["seconds"])
    print(f"\nwrote {json_path} and {png_path}")
    return 0


def _print_lesion(result: dict[str, Any], title: str, seconds: float) -> None:
    policies = result["bn"]
    intact = ", ".join(f"{result['intact'][p]:.2f}% ({p} BN)" for p in policies)
    print(f"{title}: intact {intact}; {seconds:.1f} s")
    print("\ndeleting one block: top-1 (%) and drop (points); ratio = ||block(x) - x|| / ||x||")
    header = ["block", "stage", "in stage", "ratio"]
    header += [f"{what} {p}" for p in policies for what in ("top-1", "drop")]
    rows = [
        [r["index"], r["stage"], r["block"], r["norm_ratio"]]
        + [r[p][key] for p in policies for key in ("acc", "drop")]
        for r in result["blocks"]
    ]
    print(table(header, rows))
    print("\ndeleting k blocks: top-1 (%) of the worst, best and random k (mean of draws)")
    header = ["k"] + [f"{what} {p}" for p in policies for what in ("worst", "best", "random")]
    rows = []
    for i, k in enumerate(result["ks"]):
        row: list[Any] = [k]
        for p in policies:
            curve = result["curves"][p][i]
            randoms = curve["random"]
            row += [curve["worst"]["acc"], curve["best"]["acc"]]
            row.append(randoms["acc_mean"] if randoms else None)
        rows.append(row)
    print(table(header, rows))


def cmd_kl_drift(args: argparse.Namespace) -> int:
    run = Path(args.run)
    records = read_kl_drift(run)
    summary = kl_drift_summary(records)
    payload = {
        "analysis": "kl-drift",
        "command": command_line(args),
        "run": str(run),
        "summary": summary,
        "records": records,
    }
    out = Path(args.out) if args.out is not None else run / "analysis" / "kl-drift"
    json_path, png_path = _save(out, "kl_drift", payload, partial(plot_kl_drift, records))
    print("KL(main || sub-network) over the recorded sub-networks, per epoch")
    print(
        table(
            ["epoch", "sub-networks", "min", "median", "mean", "max"],
            [
                [s["epoch"] + 1, s["count"], s["min"], s["median"], s["mean"], s["max"]]
                for s in summary
            ],
        )
    )
    print(f"\nwrote {json_path} and {png_path}")
    return 0


def cmd_logits(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    opened = _open_all(args, device)
    data = _data(opened[0], args, device)
    start = time.perf_counter()
    rows = [
        {
            "label": label,
            "checkpoint": str(x.path),
            **logit_norms(x.model, _eval_fn(data, args, x.cfg)()),
        }
        for label, x in zip(_labels(opened), opened)
    ]
    header = _header("logits", args, opened[0], time.perf_counter() - start)
    header["checkpoints"] = [str(x.path) for x in opened]
    out = output_folder(args.out, opened[0], "logits")
    payload = {**header, "models": rows}
    json_path, png_path = _save(out, "logits", payload, partial(plot_logit_norms, rows))
    print(
        table(
            ["model", "mean L2 norm", "std", "top-1 (%)"],
            [[r["label"], r["mean_norm"], r["std_norm"], r["acc"]] for r in rows],
        )
    )
    print(f"\nwrote {json_path} and {png_path}")
    return 0


def cmd_erf(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    ckpt, data = _open(args, device)
    subnet = Subnet.parse(ckpt.model, args.subnet) if args.subnet else None
    size = args.input_size or data.test_img_size
    start = time.perf_counter()
    erf = effective_receptive_field(
        ckpt.model,
        _eval_fn(data, args, ckpt.cfg)(),
        input_size=size,
        num_images=args.images,
        subnet=subnet,
        calib_batches=_calib_fn(data, args, ckpt.cfg) if subnet is not None else None,
    )
    ratios = erf_area_ratios(erf)
    stem = f"erf-{size}" + (f"-{subnet}" if subnet is not None else "")
    payload = {
        **_header("erf", args, ckpt, time.perf_counter() - start),
        "subnet": str(subnet) if subnet is not None else None,
        "input_size": size,
        "images": min(args.images, data.n_test if args.split == "test" else data.n_val),
        "area_ratios": ratios,
        "map_file": f"{stem}.npy",
    }
    out = output_folder(args.out, ckpt, "erf")
    what = f"sub-network {subnet}" if subnet is not None else "main network"
    title = f"{ckpt.cfg.model.name} {what}, {size}x{size}"
    json_path, png_path = _save(out, stem, payload, partial(plot_erf, erf, title=title))
    npy_path = out / f"{stem}.npy"
    np.save(npy_path, erf)
    print(f"ERF of {ckpt.cfg.model.name} ({what}) at {size}x{size} over {payload['images']} images")
    print(table(["share of contribution", *ratios], [["area of centred square", *ratios.values()]]))
    print(f"\nwrote {json_path}, {png_path} and {npy_path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    md_path, html_path = write_report(args.run)
    print(f"wrote {md_path} and {html_path}")
    return 0
