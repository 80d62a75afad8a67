"""CT vs ST vs ST++ on all of Fashion-MNIST, for a lent GPU: one command, under 8 minutes.

    python bench/gpu_study.py --data-root /usr/share/datasets/fashion-mnist [--epochs 30]
        [--seeds 3] [--model resnet56] [--out runs/gpu_study] [--budget-minutes 8]

Trains ``recipes/fmnist_ct.yaml``, ``fmnist_st.yaml`` and ``fmnist_stpp.yaml`` (each recipe's
own method settings: nothing is tuned here) on the full 60k training images at the sizes given,
every run as its own process on the one device at the same time (one ``nestedtrain sweep`` per
recipe, all three concurrently: 3 × min(seeds, CPU cores / 3) processes share the GPU, the
number is printed), then compares them with ``nestedtrain compare`` against CT and writes the
tables, the exact commands, the device and the wall time to ``--doc``.

It prints its time estimate first: each recipe's step is timed alone on the device for a few
seconds, and the estimate is the sum over all runs of their steps at that speed (runs sharing
the GPU overlap, so the study usually takes less). Above ``--budget-minutes`` it stops there,
before training, and says which ``--epochs`` would fit.

Sweeps are resumable: rerun the same command to finish runs a time limit cut short. The
validation split (``data.val_size``, 10% of train by default) is held out as in every recipe;
``compare --split val`` reads it, the main table reads the test split.

On the CPU with tiny sizes (``--device cpu --train 256 --epochs 1``) it checks that the whole
chain runs; tests/test_bench_scripts.py does that.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
NESTEDTRAIN = [sys.executable, "-m", "nestedtrain"]
RECIPES = ("fmnist_ct", "fmnist_st", "fmnist_stpp")


def _command(args: list[str]) -> str:
    return "nestedtrain " + " ".join(shlex.quote(a) for a in args)


def _sizes(args: argparse.Namespace) -> list[str]:
    """The recipe overrides every run takes."""
    return [
        f"model.name={args.model}",
        f"epochs={args.epochs}",
        f"data.train_subset={args.train if args.train else 'null'}",
        f"data.root={args.data_root}",
        f"device={args.device}",
        f"eval.every={args.epochs}",  # the final epoch's accuracies; val is logged each eval
        f"eval.subnets={args.subnets}",
        *args.set,
    ]


def _jobs() -> tuple[int, int]:
    """(runs at a time per sweep at most, CPU threads per sweep): the cores split between
    the three sweeps."""
    threads = max(1, (os.cpu_count() or 1) // len(RECIPES))
    return threads, threads


def _processes(args: argparse.Namespace) -> int:
    """Training processes on the one GPU at a time."""
    return len(RECIPES) * min(args.seeds, _jobs()[0])


def _sweeps(args: argparse.Namespace) -> list[list[str]]:
    seeds = "seed=" + ",".join(str(s) for s in range(args.seeds))
    jobs, threads = _jobs()
    return [
        ["sweep", f"recipes/{name}.yaml", seeds, *_sizes(args), "--out", f"{args.out}/{name}"]
        + ["--jobs", str(min(args.seeds, jobs)), "--threads", str(threads)]
        for name in RECIPES
    ]


def estimate_minutes(args: argparse.Namespace, probe_seconds: float = 3.0) -> float:
    """Minutes all runs take one after another on the device, from each recipe's step timed
    alone for ``probe_seconds`` (after 3 untimed steps), plus 20 s a run to start and
    evaluate. Concurrent runs overlap where the GPU has room, so this is an upper bound."""
    from nestedtrain.engine.config import load_config
    from nestedtrain.engine.trainer import Trainer

    total = 0.0
    for name in RECIPES:
        cfg = load_config(str(REPO / "recipes" / f"{name}.yaml"), _sizes(args))
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(cfg, Path(tmp) / "probe")  # writes nothing before fit
            per_image = _seconds_per_image(trainer, probe_seconds)
            images = trainer.data.steps_per_epoch * cfg.batch_size * cfg.epochs
        total += args.seeds * (images * per_image + 20)
        del trainer
    return total / 60


def _seconds_per_image(trainer, probe_seconds: float) -> float:
    method, device = trainer.method, trainer.device
    data = trainer.data
    batches = (batch for epoch in itertools.count() for batch in data.train_batches(epoch))
    steps, start = -3, 0.0
    while steps < 1 or time.perf_counter() - start < probe_seconds:
        images, labels = next(batches)
        info = method.step(images, labels)
        method.precision.step(method.optimizer)
        method.optimizer.zero_grad(set_to_none=True)
        method.after_optimizer_step(info)
        steps += 1
        if steps == 0:
            _sync(device)
            start = time.perf_counter()
    _sync(device)
    return (time.perf_counter() - start) / (steps * trainer.cfg.batch_size)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    parser.add_argument(
        "--data-root",
        required=True,
        help="the Fashion-MNIST files (e.g. /usr/share/datasets/fashion-mnist)",
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--subnets", default="sample:16", help="eval.subnets of every run")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override of every run"
    )
    parser.add_argument("--doc", default=str(REPO / "docs" / "gpu_study.md"))
    parser.add_argument(
        "--budget-minutes", type=float, default=8.0, help="stop before training above this"
    )
    args = parser.parse_args(argv)
    start = time.time()
    minutes = estimate_minutes(args)
    print(f"Estimated time: {minutes:.1f} minutes (at most; runs overlap)", flush=True)
    print(
        f"{_processes(args)} training processes share {_device_name(args.device)} at a time "
        f"({len(RECIPES)} sweeps × {min(args.seeds, _jobs()[0])} runs)",
        flush=True,
    )
    if minutes > args.budget_minutes:
        fits = max(1, int(args.epochs * args.budget_minutes / minutes))
        raise SystemExit(
            f"over --budget-minutes {args.budget_minutes:g}: try --epochs {fits} (or raise it)"
        )
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
        f" the one device at the same time ({_processes(args)} processes at once); their wall"
        " times and images/s are measured so.",
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
