"""``nestedtrain efficiency`` and ``nestedtrain tune-k``: the Motivation paper's evaluation
(:mod:`nestedtrain.analysis.motivation`) on the command line."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from ..analysis.motivation import cross_validate_k, efficiency
from ..analysis.stats import format_mean_std
from ..atomic import atomic_write_text
from ..errors import ConfigError
from .common import add_command, add_recipe_arguments, table

__all__ = ["register"]


# --------------------------------------------------------------------------------- parser
def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``efficiency`` and ``tune-k``."""
    p = add_command(
        subparsers,
        "efficiency",
        cmd_efficiency,
        help="the Motivation paper's ACC/FLOPs and ACC/F_Ratio from run folders",
        description=(
            "ACC/FLOPs of base model X trained with motivation (its base_acc, and F_X-Y, the "
            "run's mean FLOPs per training step) and of the larger model Y trained classically, "
            "each against X trained classically, and their ratio (the paper's Table 1). "
            "ACC/FLOPs is printed in 1e-2 percentage points per MFLOP, FLOPs as nestedtrain "
            "counts them (two per multiply-add); the ratio does not depend on the convention. "
            "Several runs per option are averaged."
        ),
    )
    p.add_argument("--run", nargs="+", required=True, help="motivation run folder(s) of X with Y")
    p.add_argument(
        "--base-classical", nargs="+", required=True, help="method=ct run folder(s) of X"
    )
    p.add_argument(
        "--motivated-classical", nargs="+", required=True, help="method=ct run folder(s) of Y"
    )
    p.add_argument("--json", help="also write the numbers as JSON here")

    p = add_command(
        subparsers,
        "tune-k",
        cmd_tune_k,
        help="choose the motivation condition's k by k-fold cross-validation on train",
        description=(
            "For each k and fold, train the recipe on the other folds of the training split and "
            "evaluate its base and motivated models on the held-out fold; print mean ± std "
            "validation accuracy per k and the k with the best base model."
        ),
    )
    add_recipe_arguments(
        p, "dotted key=value overrides, e.g. epochs=3", recipe="a method: motivation recipe"
    )
    p.add_argument("--folds", type=int, default=5, help="number of folds (default 5, the paper's)")
    p.add_argument("--k", default="1,2,3,4,5", help="k values to compare (default 1,2,3,4,5)")
    p.add_argument("--out", help="a new folder for the runs (default runs/tune-k-<recipe name>)")


# Table 1 gives ACC/FLOPs in 1e-2 percentage points per MFLOP.
_TABLE_UNIT = 1e6 * 100


def _pm(mean: float, std: float | None) -> str:
    """``mean ± std``, or the mean alone for one run."""
    return format_mean_std({"mean": mean, "std": std})


# ----------------------------------------------------------------------------- efficiency
def cmd_efficiency(args: argparse.Namespace) -> int:
    report = efficiency(args.run, args.base_classical, args.motivated_classical)
    x = report["base_model"] or "X"
    y = report["motivated_model"] or "Y"
    rows = [
        [f"{x} (C)", _pm(*report["acc_xc"]), report["flops_xc"] / 1e6, "/"],
        [
            f"{x}-{y} (B)",
            _pm(*report["acc_xyb"]),
            report["flops_xy"] / 1e6,
            f"{report['acc_flops_xyb'] * _TABLE_UNIT:.2f} ({report['ratio']:.2f})",
        ],
        [f"{x}-{y} (M)", _pm(*report["acc_xym"]), report["flops_xy"] / 1e6, "/"],
        [
            f"{y} (C)",
            _pm(*report["acc_yc"]),
            report["flops_yc"] / 1e6,
            f"{report['acc_flops_yc'] * _TABLE_UNIT:.2f}",
        ],
    ]
    print(table(["model", "acc %", "MFLOPs", "ACC/FLOPs 1e-2 %/MFLOP (ratio)"], rows))
    print(
        f"ACC/F_Ratio_{x}-{y} = {report['ratio']:.2f}: motivation gains "
        f"{report['ratio']:.2f}x the accuracy per added FLOP that moving to {y} gains"
    )
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(report, indent=2) + "\n")
    return 0


# --------------------------------------------------------------------------------- tune-k
def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        ks = []
    if not ks or any(k < 1 for k in ks) or len(set(ks)) != len(ks):
        raise ConfigError(
            f"--k {text!r}: give distinct whole numbers >= 1 separated by commas, e.g. 1,2,3"
        )
    return ks


def cmd_tune_k(args: argparse.Namespace) -> int:
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 alone prints
    ks = _parse_ks(args.k)
    out = Path(args.out) if args.out else Path("runs") / f"tune-k-{Path(args.recipe).stem}"

    def show(result: dict[str, Any]) -> None:
        if main:
            print(
                f"k={result['k']} fold {result['fold'] + 1}/{args.folds}: base "
                f"{result['base_val_acc']:.2f}%, motivated {result['motivated_val_acc']:.2f}% "
                f"(motivated steps {result['motivated_steps']})",
                flush=True,
            )

    report = cross_validate_k(args.recipe, args.overrides, ks, args.folds, out, on_result=show)
    if not main:
        return 0
    rows = [
        [
            r["k"],
            _pm(r["base_val_acc"], r["base_val_acc_std"]),
            _pm(r["motivated_val_acc"], r["motivated_val_acc_std"]),
            r["motivated_steps"],
        ]
        for r in report["per_k"]
    ]
    print(table(["k", "base val acc %", "motivated val acc %", "motivated steps"], rows))
    print(
        f"best k: {report['best_k']} (highest mean validation accuracy of the base model over "
        f"{args.folds} folds); results in {out / 'tune_k.json'}"
    )
    return 0
