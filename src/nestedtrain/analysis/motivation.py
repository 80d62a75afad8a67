"""The Motivation paper's evaluation: efficiency from finished runs, and k by cross-validation.

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

``nestedtrain efficiency`` and ``nestedtrain tune-k`` print them (:mod:`nestedtrain.cli`).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..atomic import atomic_write_text
from ..engine.config import load_config
from ..engine.trainer import Trainer
from ..errors import ConfigError
from ..evaluation import evaluate
from ..flops import acc_flops_ratio
from ..records import CONFIG_FILE, SUMMARY_FILE, read_summary
from .stats import mean_std

__all__ = ["cross_validate_k", "efficiency", "efficiency_metrics"]

# A run's summary.json as read, and the file it came from.
_Summary = tuple[dict[str, Any], Path]

# What the metrics read: value -> (the role whose runs hold it, its summary key, what it is).
_READS = {
    "acc_xyb": ("run", "base_acc", "the base model's test accuracy"),
    "acc_xym": ("run", "motivated_acc", "the motivated model's test accuracy"),
    "flops_xy": ("run", "flops_per_image", "F_X-Y, the run's mean step FLOPs"),
    "acc_xc": ("base-classical", "main_acc", "the test accuracy"),
    "flops_xc": ("base-classical", "flops", "the model's FLOPs"),
    "acc_yc": ("motivated-classical", "main_acc", "the test accuracy"),
    "flops_yc": ("motivated-classical", "flops", "the model's FLOPs"),
}

# The method each role's runs must have been trained with.
_ROLE_METHODS = {"run": "motivation", "base-classical": "ct", "motivated-classical": "ct"}


# ----------------------------------------------------------------------------- efficiency
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
        ConfigError: a missing or unreadable summary, a missing value, runs of different
            methods, models or datasets where summaries say so, or a metric that is undefined
            (no FLOPs added, or Y no more accurate than X).
    """
    read = _read_roles(
        {"run": runs, "base-classical": base_classical, "motivated-classical": motivated_classical}
    )
    _check_methods(read)
    base_model, motivated_model = _check_same_task(read)

    found = efficiency_metrics(read)

    def pair(name: str) -> tuple[float, float | None]:
        return found[name]["mean"], found[name]["std"]

    return {
        "base_model": base_model,
        "motivated_model": motivated_model,
        "acc_xc": pair("acc_xc"),
        "acc_xyb": pair("acc_xyb"),
        "acc_xym": pair("acc_xym"),
        "acc_yc": pair("acc_yc"),
        "flops_xc": found["flops_xc"]["mean"],
        "flops_xy": found["flops_xy"]["mean"],
        "flops_yc": found["flops_yc"]["mean"],
        "acc_flops_xyb": found["acc_flops_xyb"],
        "acc_flops_yc": found["acc_flops_yc"],
        "ratio": found["ratio"],
        "runs": {role: len(entries) for role, entries in read.items()},
    }


def efficiency_metrics(read: dict[str, list[_Summary]]) -> dict[str, Any]:
    """The paper's metrics from the summaries of each role's runs (``run``,
    ``base-classical``, ``motivated-classical``).

    Returns:
        Each value of :data:`_READS` as :func:`~nestedtrain.analysis.stats.mean_std` over its
        role's runs, and, from the means, ``acc_flops_xyb``, ``acc_flops_yc`` and ``ratio``.

    Raises:
        ConfigError: a missing value, or a metric that is undefined.
    """
    found = {
        name: mean_std([_number(s, key, f, what) for s, f in read[role]])
        for name, (role, key, what) in _READS.items()
    }
    mean = {name: stat["mean"] for name, stat in found.items()}
    metrics = acc_flops_ratio(
        *(mean[n] for n in ("acc_xyb", "acc_xc", "acc_yc", "flops_xy", "flops_xc", "flops_yc"))
    )
    found["acc_flops_xyb"] = metrics.motivated_training
    found["acc_flops_yc"] = metrics.larger_model
    found["ratio"] = metrics.ratio
    return found


def _read_roles(paths: dict[str, Sequence[str | Path]]) -> dict[str, list[_Summary]]:
    """Each role's summaries; every role needs at least one run."""
    read = {}
    for role, folders in paths.items():
        if not folders:
            raise ConfigError(f"--{role} needs at least one run folder")
        read[role] = [_read_summary(p) for p in folders]
    return read


def _read_summary(path: str | Path) -> _Summary:
    path = Path(path)
    return read_summary(path), path / SUMMARY_FILE if path.is_dir() else path


def _check_methods(read: dict[str, list[_Summary]]) -> None:
    """Motivation runs are motivation runs, classical ones ``method=ct`` (where they say)."""
    for role, want in _ROLE_METHODS.items():
        for summary, file in read[role]:
            if summary.get("method", want) != want:
                raise ConfigError(
                    f"--{role} {str(file)!r} is a method={summary['method']!r} run; it must be "
                    f"a method={want!r} run"
                )


def _check_same_task(read: dict[str, list[_Summary]]) -> tuple[str | None, str | None]:
    """One dataset, one base model X and one motivated model Y; returns X's and Y's names
    (None where no run says)."""
    every = [entry for entries in read.values() for entry in entries]
    _agree({str(f): s.get("dataset") for s, f in every}, "the dataset")
    base_names = {str(f): s.get("model") for s, f in read["run"] + read["base-classical"]}
    _agree(base_names, "the base model X (the motivation runs' model and --base-classical)")
    motivated_names = {str(f): _motivated_name(f) for _, f in read["run"]}
    motivated_names.update({str(f): s.get("model") for s, f in read["motivated-classical"]})
    _agree(motivated_names, "the motivated model Y (motivation.model and --motivated-classical)")
    return (
        next((n for n in base_names.values() if n), None),
        next((n for n in motivated_names.values() if n), None),
    )


def _number(summary: dict[str, Any], key: str, file: Path, what: str) -> float:
    value = summary.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{str(file)!r} has no number {key!r} ({what}); got {value!r}")
    return float(value)


def _motivated_name(file: Path) -> str | None:
    """``motivation.model`` from the run's config.yaml, when the run folder has one."""
    config = file.parent / CONFIG_FILE
    if not config.is_file():
        return None
    return OmegaConf.load(config).get("motivation", {}).get("model")


def _agree(values: dict[str, Any], what: str) -> None:
    """All known (non-None) values are equal; ``values`` maps a file to its value."""
    known = {file: v for file, v in values.items() if v is not None}
    if len(set(known.values())) > 1:
        listed = ", ".join(f"{v!r} ({file})" for file, v in known.items())
        raise ConfigError(f"the runs disagree on {what}: {listed}")


# --------------------------------------------------------------------------------- tune-k
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
        ConfigError: a recipe that is not a motivation recipe or whose condition has no k, bad
            ``ks`` or ``folds``, or an ``out`` folder that is not empty.
    """
    cfg = _check_tune_k(recipe, overrides, ks, folds, Path(out))
    results = []
    for k in ks:
        for fold in range(folds):
            run = Path(out) / f"k{k}" / f"fold{fold}"
            result = {"k": int(k), "fold": fold}
            fold_overrides = _fold_overrides(overrides, k, folds, fold)
            result.update(_train_fold(recipe, fold_overrides, run, cfg.eval.batch_size))
            results.append(result)
            if on_result is not None:
                on_result(result)
    per_k = [_summarise_k(k, [r for r in results if r["k"] == k]) for k in ks]
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
        atomic_write_text(Path(out) / "tune_k.json", json.dumps(report, indent=2) + "\n")
    return report


def _fold_overrides(overrides: Sequence[str], k: int, folds: int, fold: int) -> list[str]:
    """``overrides`` plus those that train with ``k`` on every fold but ``fold``, which is
    the validation split (and no other validation split is held out)."""
    return [
        *overrides,
        f"motivation.k={k}",
        f"data.num_folds={folds}",
        f"data.fold={fold}",
        "data.val_size=0",
    ]


def _check_tune_k(
    recipe: str | Path, overrides: Sequence[str], ks: Sequence[int], folds: int, out: Path
) -> DictConfig:
    """The recipe, once it is known to be a motivation recipe with a k to tune."""
    if folds < 2:
        raise ConfigError(f"--folds {folds}: cross-validation needs at least 2 folds")
    if not ks or any(isinstance(k, bool) or int(k) != k or k < 1 for k in ks):
        raise ConfigError(f"k values {list(ks)!r} must be whole numbers >= 1")
    cfg = load_config(recipe, list(overrides))
    if cfg.method != "motivation":
        raise ConfigError(f"tune-k tunes motivation runs, but the recipe has method={cfg.method!r}")
    if cfg.motivation.condition.startswith("random"):
        raise ConfigError(
            f"motivation.condition={cfg.motivation.condition!r} does not use k; tune-k tunes "
            "loss_decrease, ema, val_loss or grad_slope"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {str(out)!r} is not empty: choose a new folder for tune-k")
    return cfg


def _train_fold(
    recipe: str | Path, overrides: Sequence[str], run: Path, batch_size: int
) -> dict[str, Any]:
    """Train one fold into ``run``; both models' accuracy on its held-out fold."""
    trainer = Trainer(load_config(recipe, list(overrides)), run)
    summary = trainer.fit()

    def val_acc(model) -> float:
        return evaluate(model, trainer.data.eval_batches("val", batch_size=batch_size))["acc"]

    motivated = trainer.method.motivated_model
    result = {
        "base_val_acc": val_acc(trainer.model),
        "motivated_val_acc": val_acc(motivated),
        "motivated_steps": summary.get("motivated_steps"),
        "base_steps": summary.get("base_steps"),
    }
    if "motivated" in trainer.method.recalibrated_models:
        # as the run evaluates and saves it: BN statistics re-estimated from training images
        result["motivated_val_acc_raw"] = result["motivated_val_acc"]
        with trainer.evaluation.recalibrated(motivated):
            result["motivated_val_acc"] = val_acc(motivated)
    return result


def _summarise_k(k: int, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over one k's folds."""
    base = mean_std([r["base_val_acc"] for r in results])
    motivated = mean_std([r["motivated_val_acc"] for r in results])
    raw = [r["motivated_val_acc_raw"] for r in results if "motivated_val_acc_raw" in r]
    steps = [r["motivated_steps"] for r in results if r["motivated_steps"] is not None]
    return {
        "k": int(k),
        "base_val_acc": base["mean"],
        "base_val_acc_std": base["std"],
        "motivated_val_acc": motivated["mean"],
        "motivated_val_acc_std": motivated["std"],
        "motivated_val_acc_raw": statistics.fmean(raw) if raw else None,
        "motivated_steps": statistics.fmean(steps) if steps else None,
    }
