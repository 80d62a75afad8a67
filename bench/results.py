"""docs/RESULTS.md: the papers' comparisons on Fashion-MNIST at CPU scale, over seeds.

    python bench/results.py [--out runs/results] [--seeds 3] [--epochs 6] [--train 4000]

Runs three sweeps with ``nestedtrain sweep`` (resumable: run it again to continue) and
compares them with ``nestedtrain compare``:

1. loafing and its cure: CT vs ST vs ST++, main accuracy and every ordered sub-network;
2. the ST++ components one at a time on top of ST (KL⁻, 6 sub-networks, resized inputs);
3. motivation resnet20 -> resnet32 vs classical resnet20 and resnet32 (the paper's Table 1);
4. cost: training wall time of each method relative to CT, from the same sweeps.

Every setting is the recipe's (``recipes/fmnist_st.yaml``, ``recipes/
motivation_fmnist_resnet20_32.yaml``) but for the sizes given here, the same for every method:
nothing is tuned per method, and nothing is chosen on the test split.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch

REPO = Path(__file__).resolve().parents[1]
NESTEDTRAIN = [sys.executable, "-m", "nestedtrain"]


def _run(args: list[str]) -> str:
    print("$ nestedtrain " + " ".join(shlex.quote(a) for a in args), flush=True)
    done = subprocess.run([*NESTEDTRAIN, *args], capture_output=True, text=True, cwd=REPO)
    print(done.stdout[-4000:], done.stderr[-2000:], sep="\n", flush=True)
    if done.returncode != 0:
        raise SystemExit(f"nestedtrain {args[0]} failed with exit status {done.returncode}")
    return done.stdout


def _command(args: list[str]) -> str:
    return "nestedtrain " + " ".join(shlex.quote(a) for a in args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/results")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train", type=int, default=4000, help="training images")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="in all (default: all cores)")
    parser.add_argument("--doc", default=str(REPO / "docs" / "RESULTS.md"))
    args = parser.parse_args()
    out = Path(args.out)
    seeds = "seed=" + ",".join(str(s) for s in range(args.seeds))
    sizes = [
        f"epochs={args.epochs}",
        f"data.train_subset={args.train}",
        f"eval.every={args.epochs}",  # test accuracy of the final epoch; curves from val below
    ]
    jobs = ["--jobs", str(args.jobs)]
    jobs += ["--threads", str(args.threads)] if args.threads else []
    start = time.time()

    st_recipe = "recipes/fmnist_st.yaml"
    common = ["model.name=resnet20", *sizes, "eval.subnets=all"]
    loafing = ["sweep", st_recipe, "method=ct,st,stpp", seeds, *common, "--out", f"{out}/loafing"]
    ablation = ["sweep", st_recipe, "method=st", seeds, *common]
    ablation += ["+", "st.kl_norm=std", "st.norm_main_ce=true", "+", "st.num_subnets=6"]
    ablation += ["+", "st.resize=[0.43,1.0]", "--out", f"{out}/ablation"]
    mot_recipe = "recipes/motivation_fmnist_resnet20_32.yaml"
    motivation = ["sweep", mot_recipe, seeds, *sizes, "+", "method=motivation"]
    motivation += ["+", "method=ct", "model.name=resnet20,resnet32", "--out", f"{out}/motivation"]
    for sweep in (loafing, ablation, motivation):
        _run([*sweep, *jobs])
    print(f"sweeps took {(time.time() - start) / 60:.0f} minutes this time", flush=True)

    st_runs = sorted(str(p) for p in (out / "loafing").glob("method=st,*") if p.is_dir())
    comparisons = {
        "loafing": ["compare", f"{out}/loafing", "--by", "method", "--baseline", "method=ct"],
        "ablation": [
            "compare",
            *st_runs,
            f"{out}/ablation",
            "--by",
            "st.kl_norm,st.num_subnets,st.resize",
            "--baseline",
            "st.kl_norm=none,st.num_subnets=1,st.resize=None",
            "--out",
            f"{out}/ablation/compare",
        ],
        "motivation": [
            "compare",
            f"{out}/motivation",
            "--by",
            "method,model.name",
            "--baseline",
            "method=ct,model.name=resnet20",
        ],
    }
    printed = {name: _run(args) for name, args in comparisons.items()}
    results = {
        name: json.loads((Path(_out_of(a)) / "compare.json").read_text())
        for name, a in comparisons.items()
    }
    compute = sum(json.loads(p.read_text())["wall_seconds"] for p in out.glob("*/*/summary.json"))
    _write_doc(args, printed, results, comparisons, [loafing, ablation, motivation], compute / 60)


def _out_of(compare_args: list[str]) -> str:
    if "--out" in compare_args:
        return compare_args[compare_args.index("--out") + 1]
    return str(Path(compare_args[1]) / "compare")


def _write_doc(args, printed, results, comparisons, sweeps, minutes) -> None:
    versions = (
        f"torch {torch.__version__}, timm {timm.__version__}, Python {platform.python_version()}"
    )
    threads = f"{os.cpu_count()} CPU cores, {args.jobs} runs at a time, one thread each"
    doc = [
        "# Results at CPU scale",
        "",
        "Written by `python bench/results.py "
        + f"--seeds {args.seeds} --epochs {args.epochs} --train {args.train} --jobs {args.jobs}`"
        + f" on {platform.machine()} ({threads}); {versions}. The runs' wall times add up to "
        + f"{minutes:.0f} minutes.",
        "",
        f"Fashion-MNIST, {args.train} training images (seeded subset), the 10,000 test images, "
        f"{args.epochs} epochs, {args.seeds} seeds. Mean ± sample standard deviation over seeds; "
        "Δ is the paired difference to the baseline's run of the same seed. Every method uses "
        "the recipe's settings, unchanged; no setting was chosen on the test split.",
    ]
    text = {name: printed[name] for name in printed}
    doc += _section(
        "1. Loafing and its cure: CT, ST, ST++",
        sweeps[0],
        comparisons["loafing"],
        text["loafing"],
        "resnet20; sub-networks: all 27 ordered ones, BN re-estimated for each.",
    )
    doc += _section(
        "2. The ST++ components one at a time, on top of ST",
        sweeps[1],
        comparisons["ablation"],
        text["ablation"],
        "The ST runs of section 1 are the baseline (kl_norm none, 1 sub-network, no resize).",
    )
    doc += _section(
        "3. Motivation training resnet20 → resnet32 (the Motivation paper's Table 1)",
        sweeps[2],
        comparisons["motivation"],
        text["motivation"],
        "k = 2, the one k the paper states (`nestedtrain tune-k` would choose it by 5-fold "
        "cross-validation; not run here, to fit the hour).",
    )
    doc += ["", "## 4. Cost", "", *_cost_table(results), ""]
    Path(args.doc).write_text("\n".join(doc) + "\n")
    print(f"wrote {args.doc}")


def _section(title, sweep, compare, printed, note) -> list[str]:
    return [
        "",
        f"## {title}",
        "",
        note,
        "",
        "```",
        _command(sweep + ["--jobs", "2"]),
        _command(compare),
        "```",
        "",
        "```",
        printed.split("\nwrote ")[0].rstrip(),
        "```",
    ]


def _cost_table(results) -> list[str]:
    header = "| method | training images/s | CT ÷ it | run wall s | ÷ CT |"
    rows = [header, "|---|---|---|---|---|"]
    groups = results["loafing"]["groups"]
    ct = next(g for g in groups if g["label"].get("method") == "ct")
    ct_rate, ct_wall = ct["images_per_second"]["mean"], ct["wall_seconds"]["mean"]
    for group in groups:
        rate, wall = group["images_per_second"]["mean"], group["wall_seconds"]["mean"]
        rows.append(
            f"| {group['label']['method']} | {rate:.0f} | {ct_rate / rate:.2f} | {wall:.0f} | "
            f"{wall / ct_wall:.2f} |"
        )
    return [
        "From section 1's sweep, mean over seeds: training throughput (median over epochs of "
        "images/s; CT ÷ it is the cost of a step relative to CT), and the wall time of whole "
        "runs, which add the final evaluation of all 27 sub-networks (the same for every method)."
        " Runs shared the 2-core machine with another run, one thread each:",
        "",
        *rows,
    ]


if __name__ == "__main__":
    main()
