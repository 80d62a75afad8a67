"""The ``nestedtrain`` command: train, eval, export, flops, demo, analyze, report.

Library code raises; this module alone prints and sets exit codes. Bad input is one line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["entry", "main"]


class UsageError(Exception):
    """A command line argparse could not read."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise UsageError(f"{self.prog}: {message}")


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- train
def _default_out(recipe: str | None, cfg) -> Path:
    stem = Path(recipe).stem if recipe else f"{cfg.method}-{cfg.model.name}-{cfg.data.name}"
    out = Path("runs") / stem
    n = 2
    while (out / "config.yaml").exists():
        out = Path("runs") / f"{stem}-{n}"
        n += 1
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from .engine.config import load_config
    from .engine.faults import TrainingDiverged, TrainingInterrupted
    from .engine.trainer import Trainer

    cfg = load_config(args.recipe, args.overrides)
    out = Path(args.out) if args.out else _default_out(args.recipe, cfg)
    trainer = Trainer(cfg, out, resume=args.resume)
    try:
        summary = trainer.fit()
    except (TrainingInterrupted, TrainingDiverged) as stopped:
        if trainer.dist.is_main:
            print(f"nestedtrain: {stopped}", file=sys.stderr)
        return stopped.exit_status
    if trainer.dist.is_main:
        _print_summary(summary, out)
    return 0


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    print(f"run folder: {out}")
    print(
        f"main network: {_fmt(summary['main_acc'])}% top-1 on test "
        f"(best epoch {summary['best_epoch']}, {summary['wall_seconds']:.0f} s)"
    )
    if summary.get("subnets"):
        rows = [
            [s["subnet"], s["acc"], s["flops"] / 1e6, s["params"] / 1e3] for s in summary["subnets"]
        ]
        print(_table(rows, ["subnet", "acc %", "MFLOPs", "kparams"]))


# ----------------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .analysis.subnets import evaluate_subnets_shared
    from .data import build_data
    from .engine.checkpoint import load_model
    from .engine.distributed import pick_device
    from .engine.evaluate import evaluate, select_subnets
    from .flops import count_flops, count_params

    device = pick_device(args.device)
    model, cfg, state = load_model(args.checkpoint, map_location=device)
    model.to(device)
    if args.data:
        cfg.data.name = args.data
    data = build_data(cfg.data, batch_size=cfg.batch_size, seed=cfg.seed, device=device)
    if data.num_classes != state["num_classes"]:
        raise ValueError(
            f"--data {cfg.data.name} has {data.num_classes} classes but the checkpoint's model "
            f"has {state['num_classes']}"
        )
    batch = args.batch_size
    memory_mb = cfg.eval.memory_mb if args.memory_mb is None else args.memory_mb
    if not memory_mb > 0:
        raise ValueError(f"--memory-mb {memory_mb} must be > 0 (MiB)")

    def eval_batches():
        return data.eval_batches(args.split, batch_size=batch)

    def calib():
        return data.calibration_batches(batch_size=batch)

    side, chans = data.test_img_size, data.in_chans
    with torch.no_grad():
        main = evaluate(model, eval_batches())
    main.update(flops=count_flops(model, side, chans), params=count_params(model))
    subnets = select_subnets(model, args.subnets, seed=cfg.seed)
    results = [
        {
            "subnet": r["subnet"],
            "acc": r["acc"],
            "acc5": r["acc5"],
            "flops": count_flops(model, side, chans, subnet=r["subnet"]),
            "params": count_params(model, subnet=r["subnet"]),
        }
        for r in (
            evaluate_subnets_shared(model, subnets, eval_batches, calib, memory_mb=memory_mb)
            if subnets
            else []
        )
    ]
    report = {
        "checkpoint": str(args.checkpoint),
        "data": cfg.data.name,
        "split": args.split,
        "main": main,
        "subnets": results,
    }
    print(f"main network: {main['acc']:.2f}% top-1, {main['flops'] / 1e6:.2f} MFLOPs")
    if results:
        rows = [[r["subnet"], r["acc"], r["flops"] / 1e6, r["params"] / 1e3] for r in results]
        print(_table(rows, ["subnet", "acc %", "MFLOPs", "kparams"]))
    if args.json:
        from .engine.checkpoint import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(report, indent=2) + "\n")
    return 0


# --------------------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    """A sub-network as a state_dict, TorchScript or ONNX file, with a JSON sidecar."""
    from .deploy_commands import cmd_export as export

    return export(args)


# ---------------------------------------------------------------------------------- flops
def cmd_flops(args: argparse.Namespace) -> int:
    from .elastic import Subnet
    from .flops import count_flops, count_params
    from .models import create_model

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
    from .demo import run_demo

    result = run_demo(out_dir=Path(args.out), epochs=args.epochs, quick=args.quick)
    print(result["table"])
    return 0


# --------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .deploy_commands import add_export_options
    from .engine.config import describe_fields

    parser = _Parser(
        prog="nestedtrain",
        description="Train residual networks through their nested sub-networks.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "train",
        help="train with a recipe (ct | st | stpp | motivation)",
        description="Train with a YAML recipe; any field can be overridden as key=value.",
        epilog="recipe fields and defaults:\n" + describe_fields(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="YAML recipe (see recipes/)")
    p.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. epochs=3 st.lam=5"
    )
    p.add_argument("--out", help="run folder (default: runs/<recipe name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint's main network and sub-networks")
    p.add_argument("checkpoint", help="a run folder or a checkpoint .pt")
    p.add_argument("--data", help="dataset name (default: the one it was trained on)")
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--subnets", default="all", help="none | all | sample:N | 3-2-4,2-2-2")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument(
        "--memory-mb",
        type=float,
        metavar="MB",
        help="MiB of activations sub-network evaluation caches at a time; images run in chunks "
        "sized to fit, results do not change (default: the run's eval.memory_mb, 1024)",
    )
    p.add_argument("--device", default="auto")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser(
        "export",
        help="cut a sub-network out as a state_dict, TorchScript or ONNX file",
        description="Write a sub-network (BN statistics re-estimated for it) as a plain "
        "state_dict, TorchScript or ONNX file, and OUT.json beside it: source run, sub-network, "
        "input size and normalisation, classes, accuracy, FLOPs, parameters, how to load it.",
    )
    p.add_argument("checkpoint", help="a run folder or a checkpoint .pt")
    p.add_argument("--subnet", required=True, help="e.g. 3-2-4")
    p.add_argument("--out", required=True, help="output file")
    add_export_options(p)
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("flops", help="forward FLOPs per image (torch.utils.flop_counter)")
    p.add_argument("model")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--subnet", help="a sub-network, e.g. 5-5-5")
    p.set_defaults(handler=cmd_flops)

    p = sub.add_parser("demo", help="CT vs ST on digits in a few minutes on a CPU")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=int, default=None, help="epochs per method")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    p.set_defaults(handler=cmd_demo)

    from .analysis.commands import register as register_analysis
    from .deploy_commands import register as register_deploy
    from .motivation_commands import register as register_motivation
    from .sweep_commands import register as register_sweep

    register_analysis(sub)  # analyze ..., report
    register_motivation(sub)  # efficiency, tune-k
    register_deploy(sub)  # select
    register_sweep(sub)  # sweep, compare
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for bad input)."""
    # The library reports what a user should know (a checkpoint fallback, a stale lock) through
    # the "nestedtrain" logger: one line each on stderr.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("nestedtrain: %(message)s"))
    library_logger = logging.getLogger("nestedtrain")
    if not library_logger.handlers:
        library_logger.addHandler(handler)
        library_logger.setLevel(logging.INFO)
    try:
        parser = build_parser()
        args = parser.parse_args(list(argv) if argv is not None else None)
        return int(args.handler(args) or 0)
    except UsageError as err:
        print(f"{err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"nestedtrain: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nestedtrain: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
