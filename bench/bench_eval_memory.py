"""Peak memory and wall time of ``nestedtrain eval RUN --subnets all`` against the number of
evaluation images, for several ``--memory-mb`` budgets, side by side in one run.

The bench writes an ImageFolder of small random JPEGs (``train/``: 10 classes, and one
``val/`` of each size), trains the model on it for one epoch (the weights do not matter for
memory or time), then evaluates the checkpoint on each ``val/`` in a process of its own, so
each peak RSS (``ru_maxrss`` of that child) is its own. The images are read with
``data.num_workers=0``: no loader worker processes hide memory. The children run with
``MALLOC_MMAP_THRESHOLD_=131072`` unless ``--glibc-default``: glibc otherwise keeps freed
blocks of up to 32 MiB cached, and the peak RSS of one command wanders by about 100 MiB from
run to run; with the fixed threshold it is what the process holds.

    python bench/bench_eval_memory.py --sizes 256 1024 4096 --budgets 1024 128 100000

Results and the commands that made them: docs/eval_memory.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

NESTEDTRAIN = str(Path(sys.executable).with_name("nestedtrain"))


def _write_images(folder: Path, count: int, side: int, seed: int, classes: int = 10) -> None:
    rng = np.random.default_rng(seed)
    for i in range(count):
        target = folder / f"class{i % classes}"
        target.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(target / f"{i:05d}.jpg", quality=90)


def _run(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process (Linux: ru_maxrss in KiB)."""
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    out, err = child.communicate()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{err.decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--img-size", type=int, default=32, help="evaluation side")
    parser.add_argument("--subnets", default="all", help="nestedtrain eval --subnets")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        default=[1024, 128, 100000],
        help="--memory-mb values (100000: effectively no limit)",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--calib-images", type=int, default=256)
    parser.add_argument("--train-images", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the children")
    parser.add_argument("--workdir", help="keep the images and the run here (default: a temp dir)")
    parser.add_argument(
        "--glibc-default", action="store_true", help="leave glibc's mmap threshold dynamic"
    )
    args = parser.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if not args.glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_eval_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    # The JPEGs are a little larger than the side, as ImageNet's are before the centre crop.
    stored = round(args.img_size / 0.875)
    _write_images(work / "train", args.train_images, stored, seed=0)
    for n in args.sizes:
        _write_images(work / f"val-{n}" / "val", n, stored, seed=n)
        (work / f"val-{n}" / "train").symlink_to(work / "train")
    # One checkpoint, whose data.root is a link the bench points at each val-N in turn.
    root = work / "root"
    root.symlink_to(work / f"val-{args.sizes[0]}")
    run = work / "run"
    recipe = work / "recipe.yaml"
    recipe.write_text(
        f"method: ct\nmodel:\n  name: {args.model}\ndata:\n  name: imagefolder\n"
        f"  root: {root}\n  img_size: {args.img_size}\n  num_workers: 0\n  val_size: 0\n"
        f"  calib_images: {args.calib_images}\nepochs: 1\nbatch_size: 32\ndevice: cpu\n"
        "eval:\n  subnets: none\n"
    )
    _run([NESTEDTRAIN, "train", str(recipe), "--out", str(run)], env)
    print(f"python {shlex.join(sys.argv)}")
    print(
        f"model {args.model} at {args.img_size}x{args.img_size}, --subnets {args.subnets}, "
        f"{args.calib_images} calibration images, batch {args.batch_size}, OMP_NUM_THREADS "
        f"{args.threads}, glibc mmap threshold {'dynamic' if args.glibc_default else '128 KiB'}\n"
    )
    print("| eval images | --memory-mb | peak RSS (MiB) | over the main network alone | wall (s) |")
    print("|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        root.unlink()
        root.symlink_to(work / f"val-{n}")
        command = [NESTEDTRAIN, "eval", str(run), "--batch-size", str(args.batch_size)]
        command += ["--device", "cpu"]
        # The same command evaluating the main network only: imports (torch alone maps
        # about 700 MiB here), model, data and one forward at a time.
        seconds, alone = _run([*command, "--subnets", "none"], env)
        print(f"| {n} | (--subnets none) | {alone:.0f} | 0 | {seconds:.1f} |", flush=True)
        for budget in args.budgets:
            extra = ["--subnets", args.subnets, "--memory-mb", f"{budget:g}"]
            seconds, peak = _run([*command, *extra], env)
            print(
                f"| {n} | {budget:g} | {peak:.0f} | {peak - alone:+.0f} | {seconds:.1f} |",
                flush=True,
            )
    if not args.workdir:
        shutil.rmtree(work)
    # For the record, the bench's own peak (it never loads a model).
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n(bench process itself: {own:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
