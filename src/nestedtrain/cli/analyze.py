"""``nestedtrain analyze ...`` and ``nestedtrain report``: the command line of the analyses.

Each handler prints a short table and writes JSON and PNG into ``RUN/analysis/<what>/`` when
the checkpoint lives in a run folder (or ``--out DIR``). Each JSON records the command that
made it (:func:`~nestedtrain.cli.common.command_line`).
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

from ..analysis.destruct import BN_POLICIES, destruct
from ..analysis.erf import effective_receptive_field, erf_area_ratios
from ..analysis.kl_drift import kl_drift_summary
from ..analysis.lesion import LESION_BN, lesion
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
from ..engine.subnet_eval import DEFAULT_MEMORY_MB
from ..errors import ConfigError
from ..records import read_kl_drift
from .common import (
    Checkpoint,
    Handler,
    add_command,
    add_memory_option,
    batch_size,
    checkpoint_data,
    command_line,
    open_checkpoint,
    output_folder,
    parse_ints,
    parse_space,
    table,
)
from .opening import add_model_options, open_foreign, open_target

__all__ = ["register"]


# --------------------------------------------------------------------- loading, writing
def _data(ckpt: Checkpoint, args: argparse.Namespace, device: torch.device) -> Data:
    name, root = args.data, args.data_root
    if name is not None and name.startswith("imagefolder:"):
        name, root = "imagefolder", name[len("imagefolder:") :]
    return checkpoint_data(ckpt, device, name=name, root=root)


def _open(args: argparse.Namespace, device: torch.device) -> Checkpoint:
    """CHECKPOINT, or the model of --model (with --weights or --pretrained, and --data)."""
    return open_target(args, device, "checkpoint", args.out)


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
def _subnets(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    ckpt = _open(args, device)
    data = _data(ckpt, args, device)
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


def _matrix(args: argparse.Namespace) -> int:
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


def _destruct(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    delete_k = parse_ints(args.k, "--k")
    permute_k = (
        parse_ints(args.permute_k, "--permute-k") if args.permute_k is not None else delete_k
    )
    if args.max_combinations < 0:
        raise ConfigError(f"--max-combinations {args.max_combinations} must be >= 1, or 0 for all")
    ckpt = _open(args, device)
    data = _data(ckpt, args, device)
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


def _lesion(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    policies = [p for p in args.bn.split(",") if p]
    ks = None if args.k == "all" else parse_ints(args.k, "--k")
    ckpt = _open(args, device)
    data = _data(ckpt, args, device)
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


def _kl_drift(args: argparse.Namespace) -> int:
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


def _logits(args: argparse.Namespace) -> int:
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


def _erf(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    ckpt = _open(args, device)
    data = _data(ckpt, args, device)
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


def _report(args: argparse.Namespace) -> int:
    md_path, html_path = write_report(args.run)
    print(f"wrote {md_path} and {html_path}")
    return 0


# ------------------------------------------------------------------------------- options
def _chunk_options(parser: argparse.ArgumentParser) -> None:
    """``--memory-mb`` and ``--chunk-images``: where an analysis caches activations of shared
    prefixes."""
    add_memory_option(parser, DEFAULT_MEMORY_MB, str(DEFAULT_MEMORY_MB))
    parser.add_argument(
        "--chunk-images",
        type=int,
        metavar="N",
        help="chunks of at most N images (evaluation batches split to fit) instead of --memory-mb",
    )


def _data_options(parser: argparse.ArgumentParser) -> None:
    """The data and device options every analysis of checkpoints takes."""
    group = parser.add_argument_group("data and device")
    group.add_argument(
        "--data",
        metavar="DATA",
        help="evaluate on this dataset or imagefolder:PATH (default: the run's); with --model "
        "also a recipe (recipes/x.yaml)",
    )
    group.add_argument("--data-root", metavar="DIR", help="dataset root (default: the run's)")
    group.add_argument(
        "--split", choices=("test", "val"), default="test", help="evaluation split (default: test)"
    )
    group.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    group.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="evaluation and calibration batch (default: the run's eval.batch_size)",
    )
    group.add_argument(
        "--calib-images",
        type=int,
        metavar="N",
        help="training images for BN re-calibration (default: the run's data.calib_images)",
    )
    group.add_argument(
        "--out",
        metavar="DIR",
        help="write here instead of RUN/analysis/<what>/ (with --model: DIR/analysis/<what>/, "
        "DIR by default runs/analysis/<model>)",
    )


def _subnets_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--space",
        default="full",
        help="full (default), space3, or most blocks each stage may drop: N or 0,1,3,0",
    )
    parser.add_argument(
        "--sample", type=int, metavar="M", help="evaluate a seeded sample of M sub-networks"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    parser.add_argument(
        "--individual",
        nargs="+",
        metavar="CKPT",
        help="individually trained models of sub-network shapes to compare with",
    )


def _destruct_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--k", default="1,2,3", help="numbers of blocks to delete together (default 1,2,3)"
    )
    parser.add_argument(
        "--permute-k", help="numbers of transpositions per permutation (default: --k; '' for none)"
    )
    parser.add_argument(
        "--max-combinations",
        type=int,
        default=1000,
        metavar="N",
        help="evaluate a seeded sample of N combinations per k when there are more "
        "(default 1000; 0: all)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples (default 0)")
    parser.add_argument(
        "--bn",
        choices=BN_POLICIES,
        default="recalibrate",
        help="recalibrate: BN statistics re-estimated for each network (default, as the "
        "paper); own: the trained ones",
    )
    parser.add_argument("--stages", help="destroy only these stages, numbered from 1 (e.g. 1,3)")
    parser.add_argument(
        "--swap",
        nargs="+",
        metavar="S:I:J",
        help="also evaluate swapping blocks I and J of stage S",
    )


def _lesion_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--k",
        default="all",
        help="numbers of blocks to delete together: all (default: 1 up to all that can go) or 1,2,4",
    )
    parser.add_argument(
        "--random",
        type=int,
        default=10,
        metavar="N",
        help="random draws of k blocks per k (default 10; 0: none)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    parser.add_argument(
        "--bn",
        default=",".join(LESION_BN),
        help="BN statistics: own (the trained ones), recalibrate (re-estimated per lesioned "
        "network from training images) or both (default own,recalibrate)",
    )
    parser.add_argument(
        "--norm-images",
        type=int,
        default=1024,
        metavar="N",
        help="evaluation images for the residual-branch ratios (default 1024)",
    )


def _erf_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subnet", help="analyse this sub-network (BN re-calibrated), e.g. 3-2-4")
    parser.add_argument(
        "--input-size",
        type=int,
        metavar="S",
        help="resize images to SxS (default: the evaluation size)",
    )
    parser.add_argument(
        "--images", type=int, default=64, metavar="N", help="number of images (default 64)"
    )


def _add_analysis(
    which: argparse._SubParsersAction,
    name: str,
    handler: Handler,
    options: Callable[[argparse.ArgumentParser], None] | None = None,
    *,
    help: str,
    description: str,
    many: bool = False,
    chunked: bool = True,
) -> None:
    """Declare ``analyze NAME`` of trained checkpoints: CHECKPOINT (``many``: one or more),
    the analysis's own ``options``, the cache options when ``chunked``, then the data
    options."""
    p = add_command(which, name, handler, help=help, description=description)
    if many:
        p.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT")
    else:
        p.add_argument("checkpoint", metavar="CHECKPOINT", nargs="?")
    if options is not None:
        options(p)
    if chunked:
        _chunk_options(p)
    _data_options(p)
    add_model_options(p, input_size=name != "erf")  # erf has its own --input-size


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``analyze`` (subnets, matrix, destruct, kl-drift, logits, erf) and ``report``."""
    analyze = subparsers.add_parser(
        "analyze",
        help="loafing analyses of trained models",
        description="Loafing analyses of trained checkpoints. A CHECKPOINT is a .pt file of "
        "`nestedtrain train` or its run folder (then checkpoints/last.pt); or name a model "
        "trained elsewhere: --model NAME --weights FILE --data RECIPE|DATASET|imagefolder:PATH.",
    )
    which = analyze.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    _register_subnets(which)
    _register_matrix(which)
    _register_destruct(which)
    _register_lesion(which)
    _register_kl_drift(which)
    _register_logits(which)
    _register_erf(which)
    _register_report(subparsers)


def _register_subnets(which: argparse._SubParsersAction) -> None:
    """``analyze subnets``."""
    _add_analysis(
        which,
        "subnets",
        _subnets,
        _subnets_options,
        help="accuracy of every ordered sub-network (BN re-calibrated)",
        description="Accuracy of every sub-network of an ordered sampling space, each with BN "
        "statistics re-estimated for it; sub-networks that share blocks share their computation.",
    )


def _register_matrix(which: argparse._SubParsersAction) -> None:
    """``analyze matrix``."""
    _add_analysis(
        which,
        "matrix",
        _matrix,
        many=True,
        help="loafing matrix: each architecture run inside each trained model",
        description="Rows: trained models; columns: their architectures run inside them "
        "(ResNets: ordered sub-networks; DenseNets: inherited weights), BN re-calibrated; the "
        "diagonal is each model's own accuracy.",
    )


def _register_destruct(which: argparse._SubParsersAction) -> None:
    """``analyze destruct``."""
    _add_analysis(
        which,
        "destruct",
        _destruct,
        _destruct_options,
        help="accuracy drop when deleting or permuting blocks",
        description="Accuracy drop when deleting each skippable block, deleting k of them, or "
        "permuting blocks within a stage by k transpositions (ST paper, Fig. 6).",
    )


def _register_lesion(which: argparse._SubParsersAction) -> None:
    """``analyze lesion``."""
    _add_analysis(
        which,
        "lesion",
        _lesion,
        _lesion_options,
        help="lesion curves: delete single blocks, then the worst/best/random k, with own and "
        "re-estimated BN; residual-branch norms",
        description="Does the model loaf, and where? The accuracy after deleting each block, "
        "then k blocks (the k whose single deletion costs most, least, and random draws), with "
        "the trained BN statistics and with BN re-estimated; and per block the ratio of its "
        "residual branch to its skip path on evaluation images.",
    )


def _register_kl_drift(which: argparse._SubParsersAction) -> None:
    """``analyze kl-drift``: it reads a run folder's records, not a checkpoint."""
    p = add_command(
        which,
        "kl-drift",
        _kl_drift,
        help="KL(main || sub-network) over training, from a run's records",
        description="Box plots per recorded epoch of KL(main || sub-network), from "
        "RUN/analysis/kl_drift.jsonl (train with analysis.kl_drift_every=E).",
    )
    p.add_argument("run", metavar="RUN")
    p.add_argument("--out", metavar="DIR", help="write here instead of RUN/analysis/kl-drift/")


def _register_logits(which: argparse._SubParsersAction) -> None:
    """``analyze logits``."""
    _add_analysis(
        which,
        "logits",
        _logits,
        many=True,
        chunked=False,
        help="mean L2 norm of the logits and top-1, per model",
        description="Logit amplitude (mean L2 norm over the dataset) and top-1 of one model or a "
        "family of models (ST++, Fig. 4).",
    )


def _register_erf(which: argparse._SubParsersAction) -> None:
    """``analyze erf``."""
    _add_analysis(
        which,
        "erf",
        _erf,
        _erf_options,
        chunked=False,
        help="effective receptive field heat map",
        description="Gradient of the centre unit of the last feature map (summed over channels) "
        "with respect to the input; absolute value summed over channels, mean over images.",
    )


def _register_report(subparsers: argparse._SubParsersAction) -> None:
    """``report``, a top-level command beside ``analyze``."""
    p = add_command(
        subparsers,
        "report",
        _report,
        help="write RUN/report.md and a self-contained RUN/report.html",
        description="One Markdown file and one self-contained HTML page for a run folder: "
        "configuration, training curves, sub-network statistics and every analysis.",
    )
    p.add_argument("run", metavar="RUN")
