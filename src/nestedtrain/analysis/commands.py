"""``nestedtrain analyze ...`` and ``nestedtrain report``: the CLI side of the analyses.

``register(subparsers)`` adds both commands to the CLI's argparse sub-parsers; each parser
sets ``handler(args) -> int``. Handlers raise ValueError for bad input (the CLI prints it on
one line and exits 2), print a short table, and write JSON and PNG into
``RUN/analysis/<what>/`` when the checkpoint lives in a run folder (or ``--out DIR``). Each
JSON records the command that made it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..data import Data, build_data
from ..elastic.subnet import Subnet
from ..engine.checkpoint import load_model, resolve_checkpoint
from .destruct import BN_POLICIES, destruct
from .erf import effective_receptive_field, erf_area_ratios
from .kl_drift import kl_drift_summary, read_kl_drift
from .logits import logit_norms
from .matrix import loafing_matrix
from .plots import (
    plot_destruction,
    plot_erf,
    plot_kl_drift,
    plot_loafing_matrix,
    plot_logit_norms,
    plot_subnet_accuracy,
)
from .report import write_report
from .subnets import DEFAULT_MEMORY_MB, evaluate_space

__all__ = ["register"]


# ------------------------------------------------------------------------- loading
@dataclass
class _Loaded:
    path: Path
    model: nn.Module
    cfg: DictConfig
    state: dict[str, Any]
    run: Path | None


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: use auto, cpu, cuda or cuda:N") from None


def _run_folder(checkpoint: Path) -> Path | None:
    """RUN for RUN/checkpoints/x.pt, else None."""
    if (
        checkpoint.parent.name == "checkpoints"
        and (checkpoint.parent.parent / "config.yaml").is_file()
    ):
        return checkpoint.parent.parent
    return None


def _load(path: str, device: torch.device) -> _Loaded:
    resolved = resolve_checkpoint(path)
    model, cfg, state = load_model(resolved, map_location=device)
    return _Loaded(resolved, model.to(device), cfg, state, _run_folder(resolved))


def _data(loaded: _Loaded, args: argparse.Namespace, device: torch.device) -> Data:
    cfg = OmegaConf.to_object(loaded.cfg.data)  # load_model put it on today's schema
    if args.data is not None:
        cfg.name = args.data
    if args.data_root is not None:
        cfg.root = args.data_root
    data = build_data(cfg, batch_size=loaded.cfg.batch_size, seed=loaded.cfg.seed, device=device)
    if (data.num_classes, data.in_chans) != (loaded.state["num_classes"], loaded.state["in_chans"]):
        raise ValueError(
            f"{loaded.path} predicts {loaded.state['num_classes']} classes from "
            f"{loaded.state['in_chans']}-channel images but {cfg.name} has {data.num_classes} "
            f"classes and {data.in_chans} channels: pick the dataset it was trained on"
        )
    return data


def _batch_size(args: argparse.Namespace, cfg: DictConfig) -> int:
    size = args.batch_size if args.batch_size is not None else cfg.eval.batch_size
    if size < 1:
        raise ValueError(f"--batch-size {size} must be >= 1")
    return size


def _eval_fn(data: Data, args: argparse.Namespace, cfg: DictConfig):
    size = _batch_size(args, cfg)
    return lambda: data.eval_batches(args.split, batch_size=size)


def _calib_fn(data: Data, args: argparse.Namespace, cfg: DictConfig):
    size = _batch_size(args, cfg)
    if args.calib_images is not None and args.calib_images < 1:
        raise ValueError(f"--calib-images {args.calib_images} must be >= 1")
    return lambda: data.calibration_batches(num_images=args.calib_images, batch_size=size)


def _same_task(first: _Loaded, other: _Loaded) -> None:
    mine = (first.state["num_classes"], first.state["in_chans"])
    theirs = (other.state["num_classes"], other.state["in_chans"])
    if mine != theirs:
        raise ValueError(
            f"{other.path} predicts {theirs[0]} classes from {theirs[1]} channels but "
            f"{first.path} {mine[0]} from {mine[1]}: compare models trained on one dataset"
        )


# -------------------------------------------------------------------------- output
def _out_dir(args: argparse.Namespace, loaded: _Loaded, what: str) -> Path:
    """``--out``, else RUN/analysis/<what> (or analysis/<what> next to a loose checkpoint)."""
    if args.out is not None:
        return Path(args.out)
    base = loaded.run if loaded.run is not None else loaded.path.parent
    return base / "analysis" / what


def _command(
    args: argparse.Namespace, words: Sequence[str], options: Sequence[tuple[str, Any]]
) -> str:
    """The command line that reproduces an analysis, written into its JSON."""
    out = ["nestedtrain", *words]
    common = [
        ("--data", args.data),
        ("--data-root", args.data_root),
        ("--split", args.split),
        ("--device", args.device),
        ("--batch-size", args.batch_size),
        ("--calib-images", args.calib_images),
        ("--out", args.out),
    ]
    for flag, value in [*options, *common]:
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            if value:
                out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return shlex.join(out)


def _write(out: Path, stem: str, payload: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def _header(
    analysis: str, command: str, loaded: _Loaded, args: argparse.Namespace, seconds: float
) -> dict[str, Any]:
    return {
        "analysis": analysis,
        "command": command,
        "checkpoint": str(loaded.path),
        "model": loaded.cfg.model.name,
        "method": loaded.cfg.method,
        "epoch": loaded.state.get("epoch"),
        "dataset": args.data or loaded.cfg.data.name,
        "split": args.split,
        "seconds": seconds,
    }


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) >= 0.1 or v == 0 else f"{v:.3g}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for row in cells:
        print(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        )


def _ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in str(text).split(",") if v.strip() != ""]
    except ValueError:
        raise ValueError(
            f"{what} {text!r}: write integers separated by commas, e.g. 1,2,3"
        ) from None
    return values


def _space(text: str) -> Any:
    """``full``, a named space, one int, or per-stage ints ``0,1,3,0``."""
    if text == "full":
        return None
    if text.replace(",", "").replace(" ", "").isdigit():
        values = _ints(text, "--space")
        return values[0] if len(values) == 1 and "," not in text else values
    return text


# ------------------------------------------------------------------------ handlers
def _subnets(args: argparse.Namespace) -> int:
    device = _device(args.device)
    loaded = _load(args.checkpoint, device)
    data = _data(loaded, args, device)
    individual = []
    for path in args.individual or []:
        other = _load(path, device)
        _same_task(loaded, other)
        individual.append((f"{other.cfg.model.name} ({other.path})", other.model))
    command = _command(
        args,
        ["analyze", "subnets", args.checkpoint],
        [
            ("--space", args.space),
            ("--sample", args.sample),
            ("--seed", args.seed),
            ("--individual", args.individual),
            ("--chunk-images", args.chunk_images),
            ("--memory-mb", args.memory_mb),
        ],
    )
    start = time.perf_counter()
    result = evaluate_space(
        loaded.model,
        _eval_fn(data, args, loaded.cfg),
        _calib_fn(data, args, loaded.cfg),
        space=_space(args.space),
        sample=args.sample,
        seed=args.seed,
        individual=individual,
        chunk_images=args.chunk_images,
        memory_mb=args.memory_mb,
    )
    payload = {**_header("subnets", command, loaded, args, time.perf_counter() - start), **result}
    out = _out_dir(args, loaded, "subnets")
    json_path = _write(out, "subnets", payload)
    plot_subnet_accuracy(result, out / "subnets.png")
    stats = result["stats"]
    print(
        f"{stats['count']} of {result['space_size']} sub-networks of {loaded.cfg.model.name} "
        f"(space {args.space}), BN re-calibrated, in {payload['seconds']:.1f} s; main network "
        f"{result['main']['acc']:.2f}%"
    )
    _table(
        ["", "max", "mean", "std", "min"],
        [["top-1 (%)", stats["max"], stats["mean"], stats["std"], stats["min"]]],
    )
    rows = sorted((r for r in result["subnets"] if r["in_space"]), key=lambda r: r["acc"])
    shown = rows if len(rows) <= 12 else rows[:6] + rows[-6:]
    print()
    _table(
        ["sub-network", "blocks", "top-1 (%)"],
        [[r["subnet"], r["blocks"], r["acc"]] for r in shown],
    )
    if result["individual"]:
        print()
        _table(
            ["individual model", "sub-network", "alone (%)", "inside (%)"],
            [[r["label"], r["subnet"], r["acc"], r["acc_inside"]] for r in result["individual"]],
        )
    print(f"\nwrote {json_path} and {out / 'subnets.png'}")
    return 0


def _labels(loaded: Sequence[_Loaded]) -> list[str]:
    labels = [f"{x.cfg.model.name} {x.cfg.method}" for x in loaded]
    if len(set(labels)) < len(labels):
        labels = [
            f"{label} ({x.run.name if x.run else x.path.stem})" for label, x in zip(labels, loaded)
        ]
    if len(set(labels)) < len(labels):
        labels = [f"{label} #{i + 1}" for i, label in enumerate(labels)]
    return labels


def _matrix(args: argparse.Namespace) -> int:
    device = _device(args.device)
    loaded = [_load(path, device) for path in args.checkpoints]
    for other in loaded[1:]:
        _same_task(loaded[0], other)
    data = _data(loaded[0], args, device)
    command = _command(
        args,
        ["analyze", "matrix", *args.checkpoints],
        [("--chunk-images", args.chunk_images), ("--memory-mb", args.memory_mb)],
    )
    names = _labels(loaded)
    start = time.perf_counter()
    result = loafing_matrix(
        [x.model for x in loaded],
        names,
        _eval_fn(data, args, loaded[0].cfg),
        _calib_fn(data, args, loaded[0].cfg),
        architectures=[x.cfg.model.name for x in loaded],
        chunk_images=args.chunk_images,
        memory_mb=args.memory_mb,
    )
    header = _header("matrix", command, loaded[0], args, time.perf_counter() - start)
    header["checkpoints"] = [str(x.path) for x in loaded]
    out = _out_dir(args, loaded[0], "matrix")
    json_path = _write(out, "matrix", {**header, **result})
    plot_loafing_matrix(result, out / "matrix.png")
    print("top-1 (%): rows are trained models, columns architectures run inside them")
    _table(
        ["trained model", *result["architectures"]],
        [[n, *row] for n, row in zip(names, result["acc"])],
    )
    print(f"\nwrote {json_path} and {out / 'matrix.png'}")
    return 0


def _swaps(texts: Sequence[str] | None) -> list[tuple[int, int, int]]:
    swaps = []
    for text in texts or []:
        parts = text.split(":")
        try:
            stage, first, second = (int(p) for p in parts)
        except ValueError:
            raise ValueError(
                f"--swap {text!r}: write STAGE:BLOCK:BLOCK, e.g. 1:0:2 swaps blocks 0 and 2 of "
                "stage 1 (stages from 1, blocks from 0)"
            ) from None
        swaps.append((stage, first, second))
    return swaps


def _destruct(args: argparse.Namespace) -> int:
    device = _device(args.device)
    delete_k = _ints(args.k, "--k")
    permute_k = _ints(args.permute_k, "--permute-k") if args.permute_k is not None else delete_k
    max_combinations = None if args.max_combinations == 0 else args.max_combinations
    if args.max_combinations < 0:
        raise ValueError(f"--max-combinations {args.max_combinations} must be >= 1, or 0 for all")
    loaded = _load(args.checkpoint, device)
    data = _data(loaded, args, device)
    command = _command(
        args,
        ["analyze", "destruct", args.checkpoint],
        [
            ("--k", args.k),
            ("--permute-k", args.permute_k),
            ("--max-combinations", args.max_combinations),
            ("--seed", args.seed),
            ("--bn", args.bn),
            ("--stages", args.stages),
            ("--swap", args.swap),
            ("--chunk-images", args.chunk_images),
            ("--memory-mb", args.memory_mb),
        ],
    )
    start = time.perf_counter()
    result = destruct(
        loaded.model,
        _eval_fn(data, args, loaded.cfg),
        _calib_fn(data, args, loaded.cfg) if args.bn == "recalibrate" else None,
        delete_k=delete_k,
        permute_k=permute_k,
        max_combinations=max_combinations,
        seed=args.seed,
        bn=args.bn,
        stages=_ints(args.stages, "--stages"),
        swaps=_swaps(args.swap),
        chunk_images=args.chunk_images,
        memory_mb=args.memory_mb,
    )
    payload = {**_header("destruct", command, loaded, args, time.perf_counter() - start), **result}
    out = _out_dir(args, loaded, "destruct")
    json_path = _write(out, "destruct", payload)
    plot_destruction(result, out / "destruct.png")
    print(f"intact {loaded.cfg.model.name}: {result['intact']['acc']:.2f}% (BN {result['bn']})")
    print("\ndeleting one block: drop in points")
    _table(
        ["block", "stage", "in stage", "top-1 (%)", "drop"],
        [[r["index"], r["stage"], r["block"], r["acc"], r["drop"]] for r in result["delete_one"]],
    )
    for key, what in (
        ("delete", "deleting k blocks"),
        ("permute", "permuting by k transpositions"),
    ):
        if result[key]:
            print(f"\n{what}: drop in points")
            _table(
                ["k", "combinations", "evaluated", "max", "mean", "min"],
                [
                    [
                        g["k"],
                        g["total"],
                        g["evaluated"],
                        g["stats"]["max"],
                        g["stats"]["mean"],
                        g["stats"]["min"],
                    ]
                    for g in result[key]
                ],
            )
    if result["swaps"]:
        print()
        _table(
            ["swap", "sub-network", "top-1 (%)", "drop"],
            [[r["swap"], r["subnet"], r["acc"], r["drop"]] for r in result["swaps"]],
        )
    print(f"\nwrote {json_path} and {out / 'destruct.png'}")
    return 0


def _kl_drift(args: argparse.Namespace) -> int:
    run = Path(args.run)
    records = read_kl_drift(run)
    summary = kl_drift_summary(records)
    command = shlex.join(
        ["nestedtrain", "analyze", "kl-drift", args.run] + (["--out", args.out] if args.out else [])
    )
    payload = {
        "analysis": "kl-drift",
        "command": command,
        "run": str(run),
        "summary": summary,
        "records": records,
    }
    out = Path(args.out) if args.out is not None else run / "analysis" / "kl-drift"
    json_path = _write(out, "kl_drift", payload)
    plot_kl_drift(records, out / "kl_drift.png")
    print("KL(main || sub-network) over the recorded sub-networks, per epoch")
    _table(
        ["epoch", "sub-networks", "min", "median", "mean", "max"],
        [[s["epoch"] + 1, s["count"], s["min"], s["median"], s["mean"], s["max"]] for s in summary],
    )
    print(f"\nwrote {json_path} and {out / 'kl_drift.png'}")
    return 0


def _logits(args: argparse.Namespace) -> int:
    device = _device(args.device)
    loaded = [_load(path, device) for path in args.checkpoints]
    for other in loaded[1:]:
        _same_task(loaded[0], other)
    data = _data(loaded[0], args, device)
    command = _command(args, ["analyze", "logits", *args.checkpoints], [])
    start = time.perf_counter()
    rows = []
    for label, x in zip(_labels(loaded), loaded):
        rows.append(
            {
                "label": label,
                "checkpoint": str(x.path),
                **logit_norms(x.model, _eval_fn(data, args, x.cfg)()),
            }
        )
    header = _header("logits", command, loaded[0], args, time.perf_counter() - start)
    header["checkpoints"] = [str(x.path) for x in loaded]
    out = _out_dir(args, loaded[0], "logits")
    json_path = _write(out, "logits", {**header, "models": rows})
    plot_logit_norms(rows, out / "logits.png")
    _table(
        ["model", "mean L2 norm", "std", "top-1 (%)"],
        [[r["label"], r["mean_norm"], r["std_norm"], r["acc"]] for r in rows],
    )
    print(f"\nwrote {json_path} and {out / 'logits.png'}")
    return 0


def _erf(args: argparse.Namespace) -> int:
    device = _device(args.device)
    loaded = _load(args.checkpoint, device)
    data = _data(loaded, args, device)
    subnet = Subnet.parse(loaded.model, args.subnet) if args.subnet else None
    size = args.input_size or data.test_img_size
    command = _command(
        args,
        ["analyze", "erf", args.checkpoint],
        [("--subnet", args.subnet), ("--input-size", args.input_size), ("--images", args.images)],
    )
    start = time.perf_counter()
    erf = effective_receptive_field(
        loaded.model,
        _eval_fn(data, args, loaded.cfg)(),
        input_size=size,
        num_images=args.images,
        subnet=subnet,
        calib_batches=_calib_fn(data, args, loaded.cfg) if subnet is not None else None,
    )
    ratios = erf_area_ratios(erf)
    stem = f"erf-{size}" + (f"-{subnet}" if subnet is not None else "")
    payload = {
        **_header("erf", command, loaded, args, time.perf_counter() - start),
        "subnet": str(subnet) if subnet is not None else None,
        "input_size": size,
        "images": min(args.images, data.n_test if args.split == "test" else data.n_val),
        "area_ratios": ratios,
        "map_file": f"{stem}.npy",
    }
    out = _out_dir(args, loaded, "erf")
    json_path = _write(out, stem, payload)
    np.save(out / f"{stem}.npy", erf)
    what = f"sub-network {subnet}" if subnet is not None else "main network"
    plot_erf(erf, out / f"{stem}.png", title=f"{loaded.cfg.model.name} {what}, {size}x{size}")
    print(
        f"ERF of {loaded.cfg.model.name} ({what}) at {size}x{size} over {payload['images']} images"
    )
    _table(["share of contribution", *ratios], [["area of centred square", *ratios.values()]])
    print(f"\nwrote {json_path}, {out / (stem + '.png')} and {out / (stem + '.npy')}")
    return 0


def _report(args: argparse.Namespace) -> int:
    md_path, html_path = write_report(args.run)
    print(f"wrote {md_path} and {html_path}")
    return 0


# ------------------------------------------------------------------------- parsers
def _memory_mb(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is no memory budget: give MiB > 0, e.g. 512")
    return value


def _data_options(parser: argparse.ArgumentParser, chunked: bool = False) -> None:
    """The data/device options every analysis takes (and ``--memory-mb``, ``--chunk-images``
    where it caches activations of shared prefixes)."""
    if chunked:
        parser.add_argument(
            "--memory-mb",
            type=_memory_mb,
            default=DEFAULT_MEMORY_MB,
            metavar="MB",
            help="cache at most about MB MiB of activations at a time: images run in chunks "
            f"sized to fit; results do not change (default {DEFAULT_MEMORY_MB})",
        )
        parser.add_argument(
            "--chunk-images",
            type=int,
            metavar="N",
            help="chunks of at most N images (at least one batch) instead of --memory-mb",
        )
    group = parser.add_argument_group("data and device")
    group.add_argument(
        "--data", metavar="NAME", help="evaluate on this dataset (default: the run's)"
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
    group.add_argument("--out", metavar="DIR", help="write here instead of RUN/analysis/<what>/")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``analyze`` (subnets, matrix, destruct, kl-drift, logits, erf) and ``report``."""
    analyze = subparsers.add_parser(
        "analyze",
        help="loafing analyses of trained models",
        description="Loafing analyses of trained checkpoints. A CHECKPOINT is a .pt file of "
        "`nestedtrain train` or its run folder (then checkpoints/last.pt).",
    )
    which = analyze.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)

    p = which.add_parser(
        "subnets",
        help="accuracy of every ordered sub-network (BN re-calibrated)",
        description="Accuracy of every sub-network of an ordered sampling space, each with BN "
        "statistics re-estimated for it; sub-networks that share blocks share their computation.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument(
        "--space",
        default="full",
        help="full (default), space3, or most blocks each stage may drop: N or 0,1,3,0",
    )
    p.add_argument(
        "--sample", type=int, metavar="M", help="evaluate a seeded sample of M sub-networks"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    p.add_argument(
        "--individual",
        nargs="+",
        metavar="CKPT",
        help="individually trained models of sub-network shapes to compare with",
    )
    _data_options(p, chunked=True)
    p.set_defaults(handler=_subnets)

    p = which.add_parser(
        "matrix",
        help="loafing matrix: each architecture run inside each trained model",
        description="Rows: trained models; columns: their architectures run inside them "
        "(ResNets: ordered sub-networks; DenseNets: inherited weights), BN re-calibrated; the "
        "diagonal is each model's own accuracy.",
    )
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT")
    _data_options(p, chunked=True)
    p.set_defaults(handler=_matrix)

    p = which.add_parser(
        "destruct",
        help="accuracy drop when deleting or permuting blocks",
        description="Accuracy drop when deleting each skippable block, deleting k of them, or "
        "permuting blocks within a stage by k transpositions (ST paper, Fig. 6).",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument(
        "--k", default="1,2,3", help="numbers of blocks to delete together (default 1,2,3)"
    )
    p.add_argument(
        "--permute-k", help="numbers of transpositions per permutation (default: --k; '' for none)"
    )
    p.add_argument(
        "--max-combinations",
        type=int,
        default=1000,
        metavar="N",
        help="evaluate a seeded sample of N combinations per k when there are more (default 1000; 0: all)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the samples (default 0)")
    p.add_argument(
        "--bn",
        choices=BN_POLICIES,
        default="recalibrate",
        help="recalibrate: BN statistics re-estimated for each network (default, as the paper); own: the trained ones",
    )
    p.add_argument("--stages", help="destroy only these stages, numbered from 1 (e.g. 1,3)")
    p.add_argument(
        "--swap",
        nargs="+",
        metavar="S:I:J",
        help="also evaluate swapping blocks I and J of stage S",
    )
    _data_options(p, chunked=True)
    p.set_defaults(handler=_destruct)

    p = which.add_parser(
        "kl-drift",
        help="KL(main || sub-network) over training, from a run's records",
        description="Box plots per recorded epoch of KL(main || sub-network), from "
        "RUN/analysis/kl_drift.jsonl (train with analysis.kl_drift_every=E).",
    )
    p.add_argument("run", metavar="RUN")
    p.add_argument("--out", metavar="DIR", help="write here instead of RUN/analysis/kl-drift/")
    p.set_defaults(handler=_kl_drift)

    p = which.add_parser(
        "logits",
        help="mean L2 norm of the logits and top-1, per model",
        description="Logit amplitude (mean L2 norm over the dataset) and top-1 of one model or a "
        "family of models (ST++, Fig. 4).",
    )
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT")
    _data_options(p)
    p.set_defaults(handler=_logits)

    p = which.add_parser(
        "erf",
        help="effective receptive field heat map",
        description="Gradient of the centre unit of the last feature map (summed over channels) "
        "with respect to the input; absolute value summed over channels, mean over images.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("--subnet", help="analyse this sub-network (BN re-calibrated), e.g. 3-2-4")
    p.add_argument(
        "--input-size",
        type=int,
        metavar="S",
        help="resize images to SxS (default: the evaluation size)",
    )
    p.add_argument(
        "--images", type=int, default=64, metavar="N", help="number of images (default 64)"
    )
    _data_options(p)
    p.set_defaults(handler=_erf)

    p = subparsers.add_parser(
        "report",
        help="write RUN/report.md and a self-contained RUN/report.html",
        description="One Markdown file and one self-contained HTML page for a run folder: "
        "configuration, training curves, sub-network statistics and every analysis.",
    )
    p.add_argument("run", metavar="RUN")
    p.set_defaults(handler=_report)
