"""docs/RESULTS.md: the papers' comparisons on Fashion-MNIST at the longest CPU schedule here.

    python bench/results.py [--out runs/results] [--seeds 3] [--epochs 30] [--train 3000]

One command, resumable (finished runs are skipped, so running it again continues or only
rewrites the document). Two chains of runs go side by side, one thread each:

A. CT and ST at λ 1 and 5 (the ST appendix found 5-10 best on CIFAR), one sweep; then CT of
   resnet32 (motivation's larger model);
B. ``nestedtrain tune-k`` for motivation's k (3 folds, k 1-3, a third of the epochs), then
   motivation resnet20 -> resnet32 with the chosen k, then ST++ (``recipes/fmnist_stpp.yaml``:
   its λ 1/6 per sub-network was chosen on validation splits, docs/stpp_lambda.md).

Then, with ``nestedtrain compare``: ST's λ is chosen on the validation split (10% of the
training images), and the test split is reported for the chosen settings only: CT vs ST vs ST++
(main network and 16 sampled sub-networks), motivation's base vs CT at the same size, and the
cost of each method. Every method shares the model, data, optimizer and schedule of
``recipes/fmnist_st.yaml`` but for the sizes given here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import timm
import torch

REPO = Path(__file__).resolve().parents[1]
NESTEDTRAIN = [sys.executable, "-m", "nestedtrain"]
ST_LAMS = ("1", "5")
TUNE_KS = "1,2,3"
TUNE_FOLDS = 3


def _run(args: list[str]) -> str:
    """``nestedtrain ARGS`` on one thread; its output, or SystemExit if it fails."""
    print("$ " + _command(args), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*NESTEDTRAIN, *args], capture_output=True, text=True, cwd=REPO, env=env)
    print(done.stdout[-4000:], done.stderr[-2000:], sep="\n", flush=True)
    if done.returncode != 0:
        raise SystemExit(f"nestedtrain {args[0]} failed with exit status {done.returncode}")
    return done.stdout


def _command(args: list[str]) -> str:
    return "nestedtrain " + " ".join(shlex.quote(a) for a in args)


def _in_parallel(*chains) -> None:
    """Run the chains (functions) side by side; re-raise the first failure."""
    failures: list[BaseException] = []

    def guarded(chain) -> None:
        try:
            chain()
        except BaseException as error:  # noqa: BLE001 - handed to the main thread below
            failures.append(error)

    threads = [threading.Thread(target=guarded, args=(chain,)) for chain in chains]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


class Study:
    """The commands of the study, from the sizes asked for."""

    def __init__(self, args: argparse.Namespace) -> None:
        out = args.out
        self.out = Path(out)
        seeds = "seed=" + ",".join(str(s) for s in range(args.seeds))
        sizes = [f"epochs={args.epochs}", f"data.train_subset={args.train}"]
        every = f"eval.every={max(1, args.epochs // 3)}"
        common = ["model.name=resnet20", *sizes, every]
        one = ["--jobs", "1", "--threads", "1"]
        self.ct_st = ["sweep", "recipes/fmnist_st.yaml", seeds, *common, "+", "method=ct"]
        self.ct_st += ["+", "method=st", "st.lam=" + ",".join(ST_LAMS), "--out", f"{out}/ct_st"]
        self.ct_st += one
        self.stpp = ["sweep", "recipes/fmnist_stpp.yaml", seeds, *common, "--out", f"{out}/stpp"]
        self.stpp += one
        # CT of the motivated model's architecture: the baseline of motivation's other model
        self.ct32 = ["sweep", "recipes/fmnist_st.yaml", seeds, "model.name=resnet32", *sizes]
        self.ct32 += [every, "method=ct", "eval.subnets=none", "--out", f"{out}/ct32", *one]
        # motivation with the study's optimizer (the recipe's own is SGD without Nesterov), so
        # that the CT runs of chain A are its classical baseline
        mot_recipe = "recipes/motivation_fmnist_resnet20_32.yaml"
        mot_common = ["optim.name=sgd", f"data.train_subset={args.train}"]
        tune_epochs = max(1, args.epochs // 3)
        # every fold's evaluation is on its held-out fold, after training
        self.tune_k = ["tune-k", mot_recipe, *mot_common, f"epochs={tune_epochs}"]
        self.tune_k += [f"eval.every={tune_epochs}"]
        self.tune_k += ["--folds", str(TUNE_FOLDS), "--k", TUNE_KS, "--out", f"{out}/tune_k"]
        self.motivation = ["sweep", mot_recipe, seeds, *mot_common, f"epochs={args.epochs}"]
        self.motivation += [every, "motivation.k={k}", "--out", f"{out}/motivation", *one]

    def chain_a(self) -> None:
        _run(self.ct_st)
        _run(self.ct32)

    def chain_b(self) -> None:
        self.best_k()
        _run(self.motivation_command())
        _run(self.stpp)

    def best_k(self) -> int:
        report = self.out / "tune_k" / "tune_k.json"
        if not report.exists():
            _run(self.tune_k)
        return int(json.loads(report.read_text())["best_k"])

    def motivation_command(self) -> list[str]:
        k = self.best_k()
        return [a.replace("{k}", str(k)) for a in self.motivation]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/results")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--train", type=int, default=3000, help="training images")
    parser.add_argument("--doc", default=str(REPO / "docs" / "RESULTS.md"))
    args = parser.parse_args()
    study = Study(args)
    start = time.time()
    _in_parallel(study.chain_a, study.chain_b)
    print(f"runs took {(time.time() - start) / 60:.0f} minutes this time", flush=True)

    out = study.out
    choice = ["compare", f"{out}/ct_st", "--by", "method,st.lam", "--baseline", "method=ct"]
    choice += ["--split", "val", "--out", f"{out}/compare_val"]
    printed_val = _run(choice)
    val = json.loads((out / "compare_val" / "compare.json").read_text())
    st_val = [g for g in val["groups"] if g["label"].get("method") == "st"]
    chosen = max(st_val, key=lambda g: g["main_acc"]["mean"])
    lam = chosen["label"]["st.lam"]
    chosen_runs = list(chosen["runs"])
    ct_runs = sorted(str(p) for p in (out / "ct_st").glob("*method=ct*") if p.is_dir())
    test = ["compare", *ct_runs, *chosen_runs, f"{out}/stpp", "--by", "method"]
    test += ["--baseline", "method=ct", "--out", f"{out}/compare_test"]
    printed_test = _run(test)
    mot = ["compare", *ct_runs, f"{out}/ct32", f"{out}/motivation", "--by", "method,model.name"]
    mot += ["--baseline", "method=ct,model.name=resnet20", "--out", f"{out}/compare_motivation"]
    printed_mot = _run(mot)
    tune = json.loads((out / "tune_k" / "tune_k.json").read_text())
    results = json.loads((out / "compare_test" / "compare.json").read_text())
    summaries = list(out.glob("*/*/summary.json")) + list(out.glob("tune_k/*/*/summary.json"))
    compute = sum(json.loads(p.read_text()).get("wall_seconds", 0.0) for p in summaries)
    motivation = {
        p.parent.name: json.loads(p.read_text())
        for p in sorted((out / "motivation").glob("*/summary.json"))
    }
    doc = _document(
        args,
        study,
        {"val": (choice, printed_val), "test": (test, printed_test), "mot": (mot, printed_mot)},
        lam,
        tune,
        results,
        motivation,
        compute / 60,
    )
    Path(args.doc).write_text("\n".join(doc) + "\n")
    print(f"wrote {args.doc}")


def _block(*lines: str) -> list[str]:
    return ["```", *lines, "```"]


def _table(printed: str) -> str:
    return printed.split("\nwrote ")[0].rstrip()


def _document(args, study, compared, lam, tune, results, motivation, minutes) -> list[str]:
    versions = f"torch {torch.__version__}, timm {timm.__version__}, Python "
    versions += platform.python_version()
    command = f"python bench/results.py --seeds {args.seeds} --epochs {args.epochs} "
    command += f"--train {args.train}"
    per_k = ", ".join(
        f"k={r['k']}: base {r['base_val_acc']:.2f} ± {r['base_val_acc_std']:.2f}%"
        for r in tune["per_k"]
    )
    doc = [
        "# Results at CPU scale",
        "",
        f"Written by `{command}` on {platform.machine()} ({os.cpu_count()} CPU cores, two runs "
        f"at a time, one thread each); {versions}. The runs' wall times add up to "
        f"{minutes:.0f} minutes.",
        "",
        f"Fashion-MNIST, resnet20, {args.train} training images (a seeded subset; 10% of the "
        f"training split held out before it as the validation split), the 10,000 test images, "
        f"{args.epochs} epochs, SGD (Nesterov) lr 0.1 cosine, weight decay 5e-4, batch 128, "
        f"{args.seeds} seeds. Mean ± sample standard deviation over seeds; Δ is the paired "
        "difference to CT's run of the same seed. Settings were chosen on the validation split; "
        "the test split is shown for the chosen settings only.",
        "",
        "## 1. CT, ST, ST++: the main network and its sub-networks",
        "",
        f"ST's λ (per step, one sub-network) was chosen among {', '.join(ST_LAMS)} on the "
        f"validation split: **λ {lam}**. ST++ is `recipes/fmnist_stpp.yaml` (6 sub-networks, "
        "KL⁻ std, normalised main CE, resized inputs, λ 1/6 per sub-network, chosen on the "
        "validation splits of docs/stpp_lambda.md). Sub-networks: 16 sampled ordered ones, BN "
        "re-estimated for each.",
        "",
        "Validation split (the choice of λ):",
        "",
        *_block(_command(study.ct_st), _command(compared["val"][0])),
        "",
        *_block(_table(compared["val"][1])),
        "",
        "Test split, chosen settings:",
        "",
        *_block(_command(study.stpp), _command(compared["test"][0])),
        "",
        *_block(_table(compared["test"][1])),
        "",
        "## 2. Motivation training resnet20 → resnet32",
        "",
        f"k chosen by `nestedtrain tune-k` ({TUNE_FOLDS} folds of the training images, k "
        f"{TUNE_KS}, {max(1, args.epochs // 3)} epochs - a third of the schedule, to fit the "
        f"machine; the paper uses 5 folds): {per_k} → **k {tune['best_k']}**. The baselines "
        "are section 1's CT runs of resnet20 and CT runs of resnet32 (same optimizer, schedule "
        "and seeds); the row `motivation` is the base resnet20, and the motivation columns "
        "compare its two models with those.",
        "",
        *_block(
            _command(study.tune_k),
            _command(study.motivation_command()),
            _command(study.ct32),
            _command(compared["mot"][0]),
        ),
        "",
        *_block(_table(compared["mot"][1])),
        "",
        *_motivated(motivation),
        "",
        "## 3. Cost",
        "",
        *_cost_table(results),
    ]
    return doc


def _motivated(summaries: dict[str, dict]) -> list[str]:
    """The motivated resnet32's test accuracy per run folder, from its summary.json."""
    rows = []
    for run, summary in summaries.items():
        motivated = summary.get("motivated_acc")
        if motivated is not None:
            rows.append(f"{run}: {motivated:.2f}%")
    if not rows:
        return []
    return ["The motivated resnet32 of the same runs, test top-1: " + "; ".join(rows) + "."]


def _cost_table(results) -> list[str]:
    header = "| method | training images/s | CT ÷ it | run wall s | ÷ CT |"
    rows = [header, "|---|---|---|---|---|"]
    groups = results["groups"]
    ct = next(g for g in groups if g["label"].get("method") == "ct")
    ct_rate, ct_wall = ct["images_per_second"]["mean"], ct["wall_seconds"]["mean"]
    for group in groups:
        rate, wall = group["images_per_second"]["mean"], group["wall_seconds"]["mean"]
        rows.append(
            f"| {group['label']['method']} | {rate:.0f} | {ct_rate / rate:.2f} | {wall:.0f} | "
            f"{wall / ct_wall:.2f} |"
        )
    return [
        "From section 1's test comparison, mean over seeds: training throughput (median over "
        "epochs of images/s; CT ÷ it is the cost of a step relative to CT) and the wall time of "
        "whole runs, which include the evaluation of 16 sub-networks (the same for every "
        "method). Two runs shared the 2-core machine, one thread each:",
        "",
        *rows,
    ]


if __name__ == "__main__":
    main()
