"""CT vs ST vs ST++ on all of Fashion-MNIST, for a lent GPU: one command, about 8 minutes.

    python bench/gpu_study.py [--epochs 30] [--seeds 3] [--model resnet56]
                              [--data-root ../shared/data] [--out runs/gpu_study]

Trains ``recipes/fmnist_ct.yaml``, ``fmnist_st.yaml`` and ``fmnist_stpp.yaml`` (each recipe's
own method settings: nothing is tuned here) on the full 60k training images at the sizes given,
every run as its own process on the one device at the same time (one ``nestedtrain sweep`` per
recipe, all three concurrently), then compares them with ``nestedtrain compare`` against CT and
writes the tables, the exact commands, the device and the wall time to ``--doc``.

Sweeps are resumable: rerun the same command to finish runs a time limit cut short. The
validation split (``data.val_size``, 10% of train by default) is held out as in every recipe;
``compare --split val`` reads it, the main table reads the test split.

On the CPU with tiny sizes (``--device cpu --train 256 --epochs 1``) it checks that the whole
chain runs; tests/test_bench_scripts.py does that.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
NESTEDTRAIN = [sys.executable, "-m", "nestedtrain"]
RECIPES = ("fmnist_ct", "fmnist_st", "fmnist_stpp")


def _command(args: list[str]) -> str:
    return "nestedtrain " + " ".join(shlex.quote(a) for a in args)


def _sweeps(args: argparse.Namespace) -> list[list[str]]:
    seeds = "seed=" + ",".join(str(s) for s in range(args.seeds))
    sizes = [
        f"model.name={args.model}",
        f"epochs={args.epochs}",
        f"data.train_subset={args.train if args.train else 'null'}",
        f"data.root={args.data_root}",
        f"device={args.device}",
        f"eval.every={args.epochs}",  # the final epoch's accuracies; val is logged each eval
        f"eval.subnets={args.subnets}",
        *args.set,
    ]
    threads = max(1, (os.cpu_count() or 1) // len(RECIPES))
    return [
        ["sweep", f"recipes/{name}.yaml", seeds, *sizes, "--out", f"{args.out}/{name}"]
        + ["--jobs", str(min(args.seeds, threads)), "--threads", str(threads)]
        for name in RECIPES
    ]


def _run_concurrently(sweeps: list[list[str]], out: Path) -> None:
    """Start every sweep at once (their runs then share the device), wait for all."""
    out.mkdir(parents=True, exist_ok=True)
    running = []
    for sweep in sweeps:
        print("$ " + _command(sweep), flush=True)
        log = open(out / f"{Path(sweep[1]).stem}.log", "w")  # noqa: SIM115 - closed below
        running.append(
            (
                sweep,
                log,
                subprocess.Popen(
                    [*NESTEDTRAIN, *sweep], cwd=REPO, stdout=log, stderr=subprocess.STDOUT
                ),
            )
        )
    failed = []
    for sweep, log, process in running:
        if process.wait() != 0:
            failed.append(f"{_command(sweep)} (exit {process.returncode}, log {log.name})")
        log.close()
    if failed:
        raise SystemExit("failed: " + "; ".join(failed))


def _compare(args: argparse.Namespace, split: str) -> tuple[list[str], str]:
    folders = [f"{args.out}/{name}" for name in RECIPES]
    compare = ["compare", *folders, "--by", "method", "--baseline", "method=ct"]
    compare += ["--split", split, "--out", f"{args.out}/compare_{split}"]
    print("$ " + _command(compare), flush=True)
    done = subprocess.run([*NESTEDTRAIN, *compare], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"compare failed: {done.stderr.strip()}")
    table = done.stdout.split("\nwrote ")[0].rstrip()
    print(table, flush=True)
    return compare, table


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.machine()} CPU ({os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu_study")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--train", type=int, default=0, help="training images; 0 = all")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--subnets", default="sample:16", help="eval.subnets of every run")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override of every run"
    )
    parser.add_argument("--doc", default=str(REPO / "docs" / "gpu_study.md"))
    args = parser.parse_args(argv)
    start = time.time()
    sweeps = _sweeps(args)
    _run_concurrently(sweeps, Path(args.out))
    comparisons = [_compare(args, split) for split in ("val", "test")]
    minutes = (time.time() - start) / 60
    lines = [
        "# CT vs ST vs ST++ on Fashion-MNIST (GPU study)",
        "",
        f"Written by `python bench/gpu_study.py {' '.join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))}`"
        f" on {_device_name(args.device)}, torch {torch.__version__}, Python"
        f" {platform.python_version()}; {minutes:.1f} minutes for all of it. All runs shared"
        " the one device at the same time; their wall times and images/s are measured so.",
        "",
        "Each recipe's own method settings, at the sizes above; mean ± sample std over seeds,"
        " Δ paired by seed against CT.",
        "",
        "```",
        *(_command(s) for s in sweeps),
        "```",
    ]
    for compare, table in comparisons:
        lines += ["", "```", _command(compare), "```", "", "```", table, "```"]
    Path(args.doc).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
