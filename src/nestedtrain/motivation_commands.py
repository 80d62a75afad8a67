"""``nestedtrain efficiency`` and ``nestedtrain tune-k``: the Motivation paper's evaluation.

- :func:`efficiency` reads finished run folders and computes the paper's Table 1 metrics for a
  base model X trained with motivated model Y: ``Acc_X-Y-B`` is the motivation run's
  ``base_acc`` (its base model, the one the paper sets out to improve), ``F_X-Y`` its
  ``flops_per_image``; ``Acc_X-C``/``F_X-C`` and ``Acc_Y-C``/``F_Y-C`` are ``main_acc`` and
  ``flops`` of the classically trained (``method: ct``) X and Y. Several runs per model are
  averaged, as the paper averages its runs.
- :func:`cross_validate_k` chooses k by k-fold cross-validation on the training set: for each k
  and fold, a run trains on the other folds and both of its models are evaluated on the held-out
  fold. The best k is the one with the highest mean validation accuracy of the *base* model
  (Acc_X-Y-B is what the paper tunes and reports); the motivated model's is shown alongside.

The ``register`` hook adds both commands to the ``nestedtrain`` CLI.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["cross_validate_k", "efficiency", "register"]

# Table 1 gives ACC/FLOPs in 1e-2 percentage points per MFLOP.
_TABLE_UNIT = 1e6 * 100


# ----------------------------------------------------------------------------- efficiency
def _read_summary(path: str | Path) -> tuple[dict[str, Any], Path]:
    path = Path(path)
    file = path / "summary.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(
            f"{str(path)!r} has no summary.json: give a finished run folder or its summary.json"
        )
    try:
        summary = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(file)!r} is not valid JSON ({err.msg})") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{str(file)!r} holds no JSON object: give a run's summary.json")
    return summary, file


def _number(summary: dict[str, Any], key: str, file: Path, what: str) -> float:
    value = summary.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{str(file)!r} has no number {key!r} ({what}); got {value!r}")
    return float(value)


def _motivated_name(file: Path) -> str | None:
    """``motivation.model`` from the run's config.yaml, when the run folder has one."""
    config = file.parent / "config.yaml"
    if not config.is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.load(config).get("motivation", {}).get("model")


def _agree(values: dict[str, Any], what: str) -> None:
    """All known (non-None) values are equal; ``values`` maps a file to its value."""
    known = {file: v for file, v in values.items() if v is not None}
    if len(set(known.values())) > 1:
        listed = ", ".join(f"{v!r} ({file})" for file, v in known.items())
        raise ValueError(f"the runs disagree on {what}: {listed}")


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def efficiency(
    runs: Sequence[str | Path],
    base_classical: Sequence[str | Path],
    motivated_classical: Sequence[str | Path],
) -> dict[str, Any]:
    """The Motivation paper's efficiency metrics from run folders (or their summary.json).

    Args:
        runs: motivation runs of base X with motivated Y (their ``base_acc``,
            ``motivated_acc`` and ``flops_per_image``).
        base_classical: runs of X trained classically (``main_acc``, ``flops``).
        motivated_classical: runs of Y trained classically.

    Returns:
        Means (and sample standard deviations, over more than one run) of the accuracies in
        percent, the FLOPs per image, ``acc_flops_xyb`` = ACC/FLOPs_X-Y-B and ``acc_flops_yc``
        = ACC/FLOPs_Y-C in percentage points per FLOP, and their ``ratio`` (ACC/F_Ratio).

    Raises:
        ValueError: a missing or unreadable summary, a missing value, runs of different
            methods, models or datasets where summaries say so, or a metric that is undefined
            (no FLOPs added, or Y no more accurate than X).
    """
    from .flops import acc_flops_ratio

    groups = {
        "run": runs,
        "base-classical": base_classical,
        "motivated-classical": motivated_classical,
    }
    read: dict[str, list[tuple[dict[str, Any], Path]]] = {}
    for role, paths in groups.items():
        if not paths:
            raise ValueError(f"--{role} needs at least one run folder")
        read[role] = [_read_summary(p) for p in paths]
    for role, want in (
        ("run", "motivation"),
        ("base-classical", "ct"),
        ("motivated-classical", "ct"),
    ):
        for summary, file in read[role]:
            if summary.get("method", want) != want:
                raise ValueError(
                    f"--{role} {str(file)!r} is a method={summary['method']!r} run; it must be "
                    f"a method={want!r} run"
                )
    every = [entry for entries in read.values() for entry in entries]
    _agree({str(f): s.get("dataset") for s, f in every}, "the dataset")
    base_names = {str(f): s.get("model") for s, f in read["run"] + read["base-classical"]}
    _agree(base_names, "the base model X (the motivation runs' model and --base-classical)")
    motivated_names = {str(f): _motivated_name(f) for _, f in read["run"]}
    motivated_names.update({str(f): s.get("model") for s, f in read["motivated-classical"]})
    _agree(motivated_names, "the motivated model Y (motivation.model and --motivated-classical)")

    def column(role: str, key: str, what: str) -> list[float]:
        return [_number(s, key, f, what) for s, f in read[role]]

    acc_xyb = _mean_std(column("run", "base_acc", "the base model's test accuracy"))
    acc_xym = _mean_std(column("run", "motivated_acc", "the motivated model's test accuracy"))
    flops_xy = _mean_std(column("run", "flops_per_image", "F_X-Y, the run's mean step FLOPs"))
    acc_xc = _mean_std(column("base-classical", "main_acc", "the test accuracy"))
    flops_xc = _mean_std(column("base-classical", "flops", "the model's FLOPs"))
    acc_yc = _mean_std(column("motivated-classical", "main_acc", "the test accuracy"))
    flops_yc = _mean_std(column("motivated-classical", "flops", "the model's FLOPs"))
    metrics = acc_flops_ratio(
        acc_xyb[0], acc_xc[0], acc_yc[0], flops_xy[0], flops_xc[0], flops_yc[0]
    )
    return {
        "base_model": next((n for n in base_names.values() if n), None),
        "motivated_model": next((n for n in motivated_names.values() if n), None),
        "acc_xc": acc_xc,
        "acc_xyb": acc_xyb,
        "acc_xym": acc_xym,
        "acc_yc": acc_yc,
        "flops_xc": flops_xc[0],
        "flops_xy": flops_xy[0],
        "flops_yc": flops_yc[0],
        "acc_flops_xyb": metrics.motivated_training,
        "acc_flops_yc": metrics.larger_model,
        "ratio": metrics.ratio,
        "runs": {role: len(entries) for role, entries in read.items()},
    }


def _acc(mean_std: tuple[float, float | None]) -> str:
    mean, std = mean_std
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def cmd_efficiency(args: argparse.Namespace) -> int:
    from .cli import _table

    report = efficiency(args.run, args.base_classical, args.motivated_classical)
    x = report["base_model"] or "X"
    y = report["motivated_model"] or "Y"
    rows = [
        [f"{x} (C)", _acc(report["acc_xc"]), report["flops_xc"] / 1e6, "/"],
        [
            f"{x}-{y} (B)",
            _acc(report["acc_xyb"]),
            report["flops_xy"] / 1e6,
            f"{report['acc_flops_xyb'] * _TABLE_UNIT:.2f} ({report['ratio']:.2f})",
        ],
        [f"{x}-{y} (M)", _acc(report["acc_xym"]), report["flops_xy"] / 1e6, "/"],
        [
            f"{y} (C)",
            _acc(report["acc_yc"]),
            report["flops_yc"] / 1e6,
            f"{report['acc_flops_yc'] * _TABLE_UNIT:.2f}",
        ],
    ]
    print(_table(rows, ["model", "acc %", "MFLOPs", "ACC/FLOPs 1e-2 %/MFLOP (ratio)"]))
    print(
        f"ACC/F_Ratio_{x}-{y} = {report['ratio']:.2f}: motivation gains "
        f"{report['ratio']:.2f}x the accuracy per added FLOP that moving to {y} gains"
    )
    if args.json:
        from .engine.checkpoint import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(report, indent=2) + "\n")
    return 0


# --------------------------------------------------------------------------------- tune-k
def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        ks = []
    if not ks or any(k < 1 for k in ks) or len(set(ks)) != len(ks):
        raise ValueError(
            f"--k {text!r}: give distinct whole numbers >= 1 separated by commas, e.g. 1,2,3"
        )
    return ks


def cross_validate_k(
    recipe: str | Path,
    overrides: Sequence[str],
    ks: Sequence[int],
    folds: int,
    out: str | Path,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Choose the motivation condition's k by ``folds``-fold cross-validation on train.

    For every k and fold, the recipe trains (``data.num_folds=folds data.fold=f``: fold f of the
    training split is the validation split, the rest is trained on) into ``out/k<k>/fold<f>``,
    and its base and motivated models are evaluated on the held-out fold. Every fold keeps the
    recipe's seed, so the k's are compared on the same folds, orders and initialisations.

    Args:
        recipe: a ``method: motivation`` recipe with a k-based condition.
        overrides: ``key=value`` overrides (``motivation.k``, ``data.fold``, ``data.num_folds``
            and ``data.val_size`` are set here).
        ks: the k's to compare.
        folds: number of folds, >= 2.
        out: a new or empty folder for the runs and ``tune_k.json``.
        on_result: called with each fold's result as it finishes.

    Returns:
        ``{"results": per fold, "per_k": means and standard deviations, "best_k": ...}``; the
        best k has the highest mean base-model validation accuracy (the smaller k on a tie).

    Raises:
        ValueError: a recipe that is not a motivation recipe or whose condition has no k, bad
            ``ks`` or ``folds``, or an ``out`` folder that is not empty.
    """
    from .engine.config import load_config
    from .engine.evaluate import evaluate
    from .engine.trainer import Trainer

    if folds < 2:
        raise ValueError(f"--folds {folds}: cross-validation needs at least 2 folds")
    if not ks or any(isinstance(k, bool) or int(k) != k or k < 1 for k in ks):
        raise ValueError(f"k values {list(ks)!r} must be whole numbers >= 1")
    cfg = load_config(recipe, list(overrides))
    if cfg.method != "motivation":
        raise ValueError(f"tune-k tunes motivation runs, but the recipe has method={cfg.method!r}")
    if cfg.motivation.condition.startswith("random"):
        raise ValueError(
            f"motivation.condition={cfg.motivation.condition!r} does not use k; tune-k tunes "
            "loss_decrease, ema, val_loss or grad_slope"
        )
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {str(out)!r} is not empty: choose a new folder for tune-k")

    results = []
    for k in ks:
        for fold in range(folds):
            fold_overrides = [
                *overrides,
                f"motivation.k={k}",
                f"data.num_folds={folds}",
                f"data.fold={fold}",
                "data.val_size=0",
            ]
            trainer = Trainer(load_config(recipe, fold_overrides), out / f"k{k}" / f"fold{fold}")
            summary = trainer.fit()
            batch = cfg.eval.batch_size
            result = {
                "k": int(k),
                "fold": fold,
                "base_val_acc": evaluate(
                    trainer.model, trainer.data.eval_batches("val", batch_size=batch)
                )["acc"],
                "motivated_val_acc": evaluate(
                    trainer.method.motivated_model,
                    trainer.data.eval_batches("val", batch_size=batch),
                )["acc"],
                "motivated_steps": summary.get("motivated_steps"),
                "base_steps": summary.get("base_steps"),
            }
            results.append(result)
            if on_result is not None:
                on_result(result)

    per_k = []
    for k in ks:
        mine = [r for r in results if r["k"] == k]
        base = _mean_std([r["base_val_acc"] for r in mine])
        motivated = _mean_std([r["motivated_val_acc"] for r in mine])
        steps = [r["motivated_steps"] for r in mine if r["motivated_steps"] is not None]
        per_k.append(
            {
                "k": int(k),
                "base_val_acc": base[0],
                "base_val_acc_std": base[1],
                "motivated_val_acc": motivated[0],
                "motivated_val_acc_std": motivated[1],
                "motivated_steps": statistics.fmean(steps) if steps else None,
            }
        )
    best = max(sorted(per_k, key=lambda r: r["k"]), key=lambda r: r["base_val_acc"])
    report = {
        "recipe": str(recipe),
        "overrides": list(overrides),
        "folds": folds,
        "ks": [int(k) for k in ks],
        "results": results,
        "per_k": per_k,
        "best_k": best["k"],
    }
    if int(os.environ.get("RANK", "0")) == 0:
        from .engine.checkpoint import atomic_write_text

        atomic_write_text(out / "tune_k.json", json.dumps(report, indent=2) + "\n")
    return report


def cmd_tune_k(args: argparse.Namespace) -> int:
    from .cli import _table

    main = int(os.environ.get("RANK", "0")) == 0
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

    def pm(mean: float, std: float | None) -> str:
        return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"

    rows = [
        [
            r["k"],
            pm(r["base_val_acc"], r["base_val_acc_std"]),
            pm(r["motivated_val_acc"], r["motivated_val_acc_std"]),
            r["motivated_steps"],
        ]
        for r in report["per_k"]
    ]
    print(_table(rows, ["k", "base val acc %", "motivated val acc %", "motivated steps"]))
    print(
        f"best k: {report['best_k']} (highest mean validation accuracy of the base model over "
        f"{args.folds} folds); results in {out / 'tune_k.json'}"
    )
    return 0


# ------------------------------------------------------------------------------- register
def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``efficiency`` and ``tune-k`` to the ``nestedtrain`` command."""
    p = subparsers.add_parser(
        "efficiency",
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
    p.set_defaults(handler=cmd_efficiency)

    p = subparsers.add_parser(
        "tune-k",
        help="choose the motivation condition's k by k-fold cross-validation on train",
        description=(
            "For each k and fold, train the recipe on the other folds of the training split and "
            "evaluate its base and motivated models on the held-out fold; print mean ± std "
            "validation accuracy per k and the k with the best base model."
        ),
    )
    p.add_argument("recipe", help="a method: motivation recipe")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. epochs=3")
    p.add_argument("--folds", type=int, default=5, help="number of folds (default 5, the paper's)")
    p.add_argument("--k", default="1,2,3,4,5", help="k values to compare (default 1,2,3,4,5)")
    p.add_argument("--out", help="a new folder for the runs (default runs/tune-k-<recipe name>)")
    p.set_defaults(handler=cmd_tune_k)
