"""``nestedtrain train``, ``eval``, ``flops`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ..atomic import atomic_write_text
from ..demo import run_demo
from ..distributed import end_distributed, pick_device
from ..elastic import Subnet, subnets_from_spec
from ..engine.config import describe_fields, load_config
from ..engine.trainer import Trainer
from ..errors import ConfigError, TrainingDiverged, TrainingInterrupted
from ..evaluation import evaluate, evaluate_subnets
from ..flops import count_flops, count_params
from ..models import create_model
from ..signals import StopRequested, StopSignals
from .common import (
    add_command,
    add_memory_option,
    add_recipe_arguments,
    checkpoint_data,
    fmt,
    table,
)
from .opening import add_model_options, open_target

__all__ = ["register"]


# --------------------------------------------------------------------------------- parser
def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train``, ``eval``, ``flops`` and ``demo``."""
    p = add_command(
        subparsers,
        "train",
        cmd_train,
        help="train with a recipe (ct | st | stpp | sandwich | motivation)",
        description="Train with a YAML recipe; any field can be overridden as key=value.",
        epilog="recipe fields and defaults:\n" + describe_fields(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_recipe_arguments(p, "dotted key=value overrides, e.g. epochs=3 st.lam=5")
    p.add_argument("--out", help="run folder (default: runs/<recipe name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument(
        "--allow-changes",
        action="store_true",
        help="with --resume: go on although the recipe changes what the run computes (epochs, "
        "optimizer, ...); the changes are recorded in the run folder's resume_changes.jsonl",
    )

    p = add_command(
        subparsers, "eval", cmd_eval, help="evaluate a checkpoint's main network and sub-networks"
    )
    p.add_argument("checkpoint", nargs="?", help="a run folder or a checkpoint .pt")
    p.add_argument(
        "--data",
        help="dataset name (default: the one it was trained on); with --model also a recipe "
        "or imagefolder:PATH",
    )
    add_model_options(p)
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--subnets", default="all", help="none | all | sample:N | 3-2-4,2-2-2")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--batch-size", type=int, default=512)
    add_memory_option(p, None, "the run's eval.memory_mb")
    p.add_argument("--device", default="auto")

    p = add_command(
        subparsers, "flops", cmd_flops, help="forward FLOPs per image (torch.utils.flop_counter)"
    )
    p.add_argument("model")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--subnet", help="a sub-network, e.g. 5-5-5")

    p = add_command(
        subparsers, "demo", cmd_demo, help="CT vs ST on digits in a few minutes on a CPU"
    )
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=int, default=None, help="epochs per method")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run")


# ---------------------------------------------------------------------------------- train
def _default_out(recipe: str | None, cfg: DictConfig) -> Path:
    stem = Path(recipe).stem if recipe else f"{cfg.method}-{cfg.model.name}-{cfg.data.name}"
    out = Path("runs") / stem
    n = 2
    while (out / "config.yaml").exists():
        out = Path("runs") / f"{stem}-{n}"
        n += 1
    return out


def cmd_train(args: argparse.Namespace) -> int:
    signals = StopSignals.installed()  # entry's, raising at once: nothing is written yet
    try:
        cfg = load_config(args.recipe, args.overrides)
        out = Path(args.out) if args.out else _default_out(args.recipe, cfg)
        if args.allow_changes and not args.resume:
            raise ConfigError(
                "--allow-changes goes with --resume: it allows a resumed run's changes"
            )
        trainer = Trainer(cfg, out, resume=args.resume, allow_changes=args.allow_changes)
    except StopRequested as stop:
        print(
            f"nestedtrain: {stop.signal_name} during start-up, before anything was written: "
            "run the same command again",
            file=sys.stderr,
        )
        return stop.exit_status
    if signals is not None:
        # From here a signal is noted: the loop stops after its step with a checkpoint (one
        # before the first step stops after it), and one after the last epoch changes nothing.
        signals.defer = True
    try:
        summary = trainer.fit()
    except (TrainingInterrupted, TrainingDiverged) as stopped:
        # Under torchrun every rank stops at the same step with the same status, and says
        # so in one line, as it does for bad input.
        print(f"nestedtrain: {stopped}", file=sys.stderr)
        return stopped.exit_status
    finally:
        end_distributed()
    if trainer.dist.is_main:
        _print_summary(summary, out)
    return 0


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    print(f"run folder: {out}")
    print(
        f"main network: {fmt(summary['main_acc'])}% top-1 on test "
        f"(best epoch {summary['best_epoch']}, {summary['wall_seconds']:.0f} s)"
    )
    if summary.get("subnets"):
        rows = [
            [s["subnet"], s["acc"], s["flops"] / 1e6, s["params"] / 1e3] for s in summary["subnets"]
        ]
        print(table(["subnet", "acc %", "MFLOPs", "kparams"], rows))


# ----------------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    ckpt = open_target(args, device, "checkpoint")
    model, cfg = ckpt.model, ckpt.cfg
    data = checkpoint_data(ckpt, device, name=args.data)
    memory_mb = cfg.eval.memory_mb if args.memory_mb is None else args.memory_mb

    def eval_batches():
        return data.eval_batches(args.split, batch_size=args.batch_size)

    def calib():
        return data.calibration_batches(batch_size=args.batch_size)

    side, chans = data.test_img_size, data.in_chans
    with torch.no_grad():
        main = evaluate(model, eval_batches())
    main.update(flops=count_flops(model, side, chans), params=count_params(model))
    subnets = subnets_from_spec(model, args.subnets, seed=cfg.seed)
    evaluated = (
        evaluate_subnets(model, subnets, eval_batches, calib, memory_mb=memory_mb)
        if subnets
        else []
    )
    results = [
        {
            "subnet": r["subnet"],
            "acc": r["acc"],
            "acc5": r["acc5"],
            "flops": count_flops(model, side, chans, subnet=r["subnet"]),
            "params": count_params(model, subnet=r["subnet"]),
        }
        for r in evaluated
    ]
    print(f"main network: {main['acc']:.2f}% top-1, {main['flops'] / 1e6:.2f} MFLOPs")
    if results:
        rows = [[r["subnet"], r["acc"], r["flops"] / 1e6, r["params"] / 1e3] for r in results]
        print(table(["subnet", "acc %", "MFLOPs", "kparams"], rows))
    if args.json:
        report = {
            "checkpoint": str(ckpt.path),
            "data": cfg.data.name if ckpt.foreign else args.data or cfg.data.name,
            "split": args.split,
            "main": main,
            "subnets": results,
        }
        atomic_write_text(Path(args.json), json.dumps(report, indent=2) + "\n")
    return 0


# ---------------------------------------------------------------------------------- flops
def cmd_flops(args: argparse.Namespace) -> int:
    model = create_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans).eval()
    subnet = Subnet.parse(model, args.subnet) if args.subnet else None
    flops = count_flops(model, args.input_size, args.in_chans, subnet=subnet)
    params = count_params(model, subnet=subnet)
    what = f"{args.model}" + (f" sub-network {subnet}" if subnet else "")
    print(
        f"{what} at {args.input_size}x{args.input_size}x{args.in_chans}: "
        f"{flops / 1e6:.2f} MFLOPs ({flops / 2e6:.2f} M multiply-adds), "
        f"{params / 1e6:.3f} M parameters"
    )
    return 0


# ----------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    result = run_demo(out_dir=Path(args.out), epochs=args.epochs, quick=args.quick)
    print(result["title"])
    print(table(result["header"], result["rows"]))
    print(f"runs: {', '.join(result['runs'])}")
    return 0
