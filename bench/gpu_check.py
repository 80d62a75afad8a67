"""Images/s and peak memory of CT, ST and ST++ against a plain PyTorch loop, for a lent GPU.

    python bench/gpu_check.py [--model resnet50] [--img-size 224] [--batch-size 128]
        [--seconds 20] [--warmup 10] [--images 32768] [--workers N] [--device cuda]
        [--doc docs/gpu_check.md]

Three parts, one process. It prints its own time estimate first (every row is timed for
``--seconds``, so the estimate is the rows' count times that plus their warm-ups: about 7
minutes at the defaults, under the 8 a lent H100 allows) and the machine it runs on.

1. **Synthetic batches** (random images already on the device): a plain PyTorch loop (timm
   model, CE, SGD, the same autocast and channels-last) against nestedtrain's CT, ST (one
   sub-network) and ST++ (six sub-networks, KL⁻, resized inputs, the ``space3`` space of the
   ImageNet recipes) steps; bf16 autocast and channels-last on CUDA. Every row is built
   afresh (the previous row's model freed), runs ``--warmup`` steps (ST++ also one forward
   and backward at each input side it can draw, so that cuDNN has tuned every shape), and
   only then resets the peak-memory counter and starts the clock: images/s of the main
   network's batch over at least ``--seconds``, and the peak memory allocated meanwhile.
2. **A JPEG folder** the script writes (``--images`` random-noise JPEGs of 300-500 px, as an
   ImageFolder tree; 1024 distinct files, the rest hard links to them): images/s of torchvision's reference pipeline (ImageFolder,
   RandomResizedCrop, flip, ToTensor, Normalize, a DataLoader with ``--workers``), of
   nestedtrain's loader alone with each ``--decoders`` value (``data.decoder``: PIL in the
   workers, torchvision's ``decode_jpeg`` or DALI on the device), of the host half of the last
   two alone (read, check; no decode), and of CT steps fed by each: what the data path gives a
   GPU with this machine's cores. Steady state: every loader runs epoch after epoch with
   persistent workers, and the clock starts once workers × prefetch batches (what the
   workers had ready before anyone asked) have been taken; then at least ``--seconds``.
   ``--repeats N`` times each loader N times in rotation.
3. **Ranks**: not run here (NCCL needs a GPU per rank); the doc says so, and that
   tests/test_distributed.py checks BN agreement with 2 gloo processes on the CPU.

Writes the numbers, the machine and the exact command to ``--doc``. On the CPU with tiny sizes
(``--device cpu --model resnet18 --img-size 64 --seconds 0.5 ...``) it checks that the script
runs; tests/test_bench_scripts.py does that.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import nestedtrain as nt
from nestedtrain.data import build_data
from nestedtrain.distributed import configure_cuda
from nestedtrain.elastic.sampling import build_sampler
from nestedtrain.engine.config import load_config
from nestedtrain.methods import CommonTraining, Precision, StimulativeTraining

REPO = Path(__file__).resolve().parents[1]
SPACE3 = {name: "space3" for name in ("resnet50", "resnet101", "resnet152")}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PREFETCH = 4  # batches each worker prepares ahead: nestedtrain's loaders, and the reference's
# Seconds a row spends besides its timed window (building, warm-up, workers' start), for the
# estimate printed first; ST++ tunes about 15 input sides on top.
ROW_OVERHEAD, STPP_OVERHEAD = 10, 20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    """Peak memory counted from now on: after a row's warm-up, the same for every row."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _free(device: torch.device) -> None:
    """Return the previous row's memory, so that no row starts with another's tensors."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peak_gib(device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a (CPU)"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}"


def _model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = nt.create_model(args.model, num_classes=1000).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)


def _timed(
    step: Callable[[int], None], args, device: torch.device, tune: Callable[[], None] | None = None
) -> tuple[float, str]:
    """Images/s of ``step`` over at least ``args.seconds`` after ``args.warmup`` steps (and
    ``tune``, the shapes a row can meet besides the warm-up's), and the peak GiB of the timed
    steps alone."""
    for i in range(args.warmup):
        step(i)
    if tune is not None:
        tune()
    _sync(device)
    _peak_reset(device)
    start, steps = time.perf_counter(), 0
    while steps < 2 or time.perf_counter() - start < args.seconds:
        step(args.warmup + steps)
        steps += 1
        if steps % 5 == 0:
            _sync(device)  # the clock reads finished work, not queued kernels
    _sync(device)
    seconds = time.perf_counter() - start
    return steps * args.batch_size / seconds, _peak_gib(device)


def _stpp_sides(args: argparse.Namespace) -> list[int]:
    """Every input side ST++ can draw: ``resize=[0.43, 1.0]`` of the crop, multiples of
    ``--resize-multiple`` (the side just above when none is in range, as the step does)."""
    lo, hi, m = max(int(0.43 * args.img_size), 1), args.img_size, args.resize_multiple
    sides = [side for side in range(lo, hi + 1) if side % m == 0] or [(hi // m + 1) * m]
    return sorted({*sides, args.img_size})


def _tune_sides(model, optimizer, precision, images, labels, sides: list[int]) -> Callable:
    """One forward and backward of the whole model at every side: cuDNN's benchmark mode
    tunes each new shape (forward and both backward passes) the first time it meets it, and
    a sub-network's convolutions at a side are the whole model's at that side."""

    def tune() -> None:
        for side in sides:
            x = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
            with precision.autocast():
                loss = F.cross_entropy(model(x).float(), labels)
            loss.backward()
        optimizer.zero_grad(set_to_none=True)

    return tune


def _plain_step(args, device: torch.device, images, labels) -> Callable[[int], None]:
    """One step of a hand-written loop: what nestedtrain's steps are measured against."""
    model = _model(args, device)
    optimizer = _optimizer(model)
    amp = device.type == "cuda"

    def step(_: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def synthetic(args: argparse.Namespace, device: torch.device) -> list[tuple[str, float, str]]:
    amp = device.type == "cuda"
    fmt = torch.channels_last if amp else torch.contiguous_format
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(
        args.batch_size, 3, args.img_size, args.img_size, device=device, generator=g
    ).contiguous(memory_format=fmt)
    labels = torch.randint(0, 1000, (args.batch_size,), device=device, generator=g)
    _free(device)
    rows = [
        ("plain PyTorch loop", *_timed(_plain_step(args, device, images, labels), args, device))
    ]
    variants = {
        "nestedtrain CT": lambda m, o, p: CommonTraining(m, o, precision=p),
        "nestedtrain ST (1 sub-network)": lambda m, o, p: StimulativeTraining(
            m, o, num_subnets=1, precision=p
        ),
        f"nestedtrain ST++ (6, KL⁻, resize, {SPACE3.get(args.model, 'whole space')})": lambda m, o, p: (
            StimulativeTraining(
                m,
                o,
                num_subnets=6,
                kl_norm="std",
                norm_main_ce=True,
                resize=[0.43, 1.0],
                resize_multiple=args.resize_multiple,
                # the ImageNet recipes' space; the whole ordered space for other models
                sampler=build_sampler(m, kind="ordered", space=SPACE3.get(args.model)),
                precision=p,
            )
        ),
    }
    for name, build in variants.items():
        _free(device)  # the previous row's model and optimizer are gone
        rows.append((name, *_method_row(args, device, build, images, labels, "ST++" in name)))
    return rows


def _method_row(args, device, build, images, labels, resizes: bool) -> tuple[float, str]:
    """Images/s and peak GiB of a nestedtrain step built by ``build``; its model, optimizer
    and step live only in here."""
    amp = device.type == "cuda"
    model = _model(args, device)
    optimizer = _optimizer(model)
    method = build(model, optimizer, Precision(device, amp=amp, dtype="bfloat16"))

    def step(_: int) -> None:
        info = method.step(images, labels)
        method.precision.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        method.after_optimizer_step(info)

    sides = _stpp_sides(args) if resizes else []
    tune = _tune_sides(model, optimizer, method.precision, images, labels, sides)
    return _timed(step, args, device, tune if resizes else None)


def write_jpegs(root: Path, count: int, classes: int = 8, unique: int = 1024) -> None:
    """``count`` JPEGs (random noise, 300-500 px, quality 90) in ``root/{train,val}/cK``.

    At most ``unique`` distinct files are encoded (in a process per core); the rest are hard
    links to them, so that an epoch holds many more batches than the workers prefetch (each
    epoch's start refills their queues: a short epoch would time that, not the steady state)
    without minutes of writing. The linked files are read from the page cache, as a node's
    local copy of a dataset mostly is.
    """
    jobs = []
    for split, n in (("train", count), ("val", max(classes, count // 8))):
        for i in range(n):
            folder = root / split / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((folder / f"{i}.JPEG", i))
    sources = jobs[:unique]
    with ProcessPoolExecutor(_cores()) as pool:
        list(pool.map(_write_jpeg, *zip(*sources), chunksize=16))
    for k, (path, _) in enumerate(jobs[unique:]):
        os.link(sources[k % len(sources)][0], path)


def _write_jpeg(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    h, w = rng.integers(300, 501, size=2)
    # smooth noise: upsampled, so the JPEGs are about as large as photographs
    small = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    Image.fromarray(small).resize((int(w), int(h)), Image.BILINEAR).save(path, quality=90)


def torchvision_reference(args, root: Path) -> float:
    """Images/s of torchvision's reference ImageNet training pipeline on the folder."""
    from torchvision import datasets, transforms

    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(args.img_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(str(root / "train"), transform),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
        persistent_workers=args.workers > 0,
        prefetch_factor=PREFETCH if args.workers > 0 else None,
    )
    return _loader_rate(_epochs(lambda _: loader), args)


def _epochs(epoch_batches: Callable[[int], Any]) -> Iterator[Any]:
    """The batches of epoch 0, 1, 2, ... without end (persistent workers carry on)."""
    epoch = 0
    while True:
        yield from epoch_batches(epoch)
        epoch += 1


def _loader_rate(batches: Iterator[Any], args, device: torch.device | None = None) -> float:
    """Images/s in steady state: the clock starts once the batches the workers prepared
    before anyone asked (workers × prefetch, at least one) are taken, and runs for at least
    ``args.seconds``."""
    for _ in range(max(1, args.workers * PREFETCH)):
        next(batches)
    if device is not None:
        _sync(device)
    start, seen = time.perf_counter(), 0
    while seen == 0 or time.perf_counter() - start < args.seconds:
        images, _ = next(batches)
        seen += len(images)
    if device is not None:
        _sync(device)
    return seen / max(time.perf_counter() - start, 1e-9)


def folder_data(args, root: Path, device: torch.device, decoder: str = "pil"):
    cfg = load_config(
        None,
        [
            "data.name=imagefolder",
            f"data.root={root}",
            f"data.img_size={args.img_size}",
            "data.val_size=0",
            f"data.num_workers={args.workers}",
            f"data.decoder={decoder}",
            *args.data_set,
        ],
    )
    return build_data(cfg.data, batch_size=args.batch_size, seed=0, device=device)


def bytes_only(args, root: Path) -> float:
    """Images/s of what stays on the host when JPEGs are decoded on the device: the workers'
    file reads and JPEG checks (decoder=torchvision|dali's worker half), no decoding."""
    from torchvision.datasets import ImageFolder

    from nestedtrain.data.decode import EncodedSamples, collate_encoded

    samples = ImageFolder(str(root / "train")).samples
    loader = torch.utils.data.DataLoader(
        EncodedSamples(samples, None, None),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        collate_fn=collate_encoded,
        drop_last=True,
        persistent_workers=args.workers > 0,
        prefetch_factor=PREFETCH if args.workers > 0 else None,
    )
    batches = _epochs(lambda _: loader)
    return _loader_rate(((batch.labels, None) for batch in batches), args)


DECODER_ROWS = {
    "pil": "nestedtrain loader, decoder=pil (PIL decode, RRC, flip in workers; uint8)",
    "torchvision": "nestedtrain loader, decoder=torchvision (decode_jpeg, RRC, flip on {device})",
    "dali": "nestedtrain loader, decoder=dali (DALI decode on {device}, RRC, flip)",
}


def _decoder_timer(args, root: Path, device: torch.device, decoder: str):
    """A function timing one epoch of ``decoder``'s loader, or the reason it cannot run."""
    try:
        data = folder_data(args, root, device, decoder)
    except ValueError as err:  # DALI not installed: say so in the table
        return str(err)

    def rate() -> float:
        return _loader_rate(_epochs(data.train_batches), args, device)

    return rate


def data_path(args, device: torch.device, parts: set[str]) -> list[tuple[str, str]]:
    """Rows of (loader, images/s): each loader timed ``--repeats`` times in rotation, so that
    a slow spell of the machine hits them alike; the median and the range."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_jpegs(root, args.images)
        timers = {
            "torchvision reference pipeline (decode, RRC, flip, ToTensor)": lambda: (
                torchvision_reference(args, root)
            )
        }
        rows = []
        for decoder in args.decoders.split(","):
            timer = _decoder_timer(args, root, device, decoder)
            if isinstance(timer, str):
                rows.append((f"decoder={decoder}: {timer}", "not run"))
            else:
                timers[DECODER_ROWS[decoder].format(device=device.type)] = timer
        if args.decoders != "pil":
            timers["their host half alone: read bytes, check JPEG (no decode)"] = lambda: (
                bytes_only(args, root)
            )
        rates: dict[str, list[float]] = {name: [] for name in timers}
        for _ in range(args.repeats):
            for name, timer in timers.items():
                rates[name].append(timer())
        rows = [(name, _median_range(values)) for name, values in rates.items()] + rows
        if "feed" in parts:
            for decoder in args.decoders.split(","):
                if DECODER_ROWS[decoder].format(device=device.type) in timers:
                    fed = _fed(args, folder_data(args, root, device, decoder), device)
                    rows.append(
                        (f"nestedtrain CT fed by its loader, decoder={decoder}", f"{fed:.0f}")
                    )
    return rows


def _median_range(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{float(np.median(values)):.0f} ({min(values):.0f}-{max(values):.0f})"


def _fed(args, data, device: torch.device) -> float:
    """Images/s of CT steps fed by nestedtrain's loader (the GPU waits when data is slow),
    in steady state as :func:`_loader_rate` times the loaders alone."""
    model = _model(args, device)
    optimizer = _optimizer(model)
    amp = device.type == "cuda"
    method = CommonTraining(model, optimizer, precision=Precision(device, amp=amp))

    def steps() -> Iterator[tuple[torch.Tensor, None]]:
        for images, labels in _epochs(data.train_batches):
            if amp:
                images = images.contiguous(memory_format=torch.channels_last)
            info = method.step(images, labels)
            method.precision.step(optimizer)
            optimizer.zero_grad(set_to_none=True)
            method.after_optimizer_step(info)
            yield images, None

    return _loader_rate(steps(), args, device)


def ranks_line(device: torch.device) -> str:
    """What this script says of DDP's BN agreement: NCCL needs a GPU per rank, and the
    2-process check with gloo on the CPU is tests/test_distributed.py's."""
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    return (
        f"DDP BN agreement not run here: {count} GPU(s), NCCL needs one per rank. "
        "tests/test_distributed.py checks it with 2 gloo processes on the CPU."
    )


def estimate_seconds(args: argparse.Namespace, parts: set[str]) -> float:
    """How long the run takes: every row is timed for ``--seconds`` (``--repeats`` times for
    the loaders), plus its set-up and warm-up (ROW_OVERHEAD, STPP_OVERHEAD)."""
    decoders = len(args.decoders.split(","))
    total = 0.0
    if "train" in parts:
        total += 4 * (args.seconds + ROW_OVERHEAD) + STPP_OVERHEAD
    if "data" in parts:
        loaders = 1 + decoders + (args.decoders != "pil")
        total += loaders * args.repeats * (args.seconds + ROW_OVERHEAD)
        total += min(args.images, 1024) * 0.02 / _cores()  # writing: ~20 ms a JPEG and core
        if "feed" in parts:
            total += decoders * (args.seconds + ROW_OVERHEAD)
    return total


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine(args: argparse.Namespace, device: torch.device) -> str:
    """The device, the CPU cores this process may use, the loader workers, torch."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        gib = torch.cuda.get_device_properties(device).total_memory / 2**30
        gpu = f"{device} ({name}, {gib:.0f} GiB)"
    else:
        gpu = f"{device} ({platform.processor() or platform.machine()})"
    return (
        f"Machine: {gpu}; {_cores()} CPU cores for this process ({os.cpu_count()} on the "
        f"node); {args.workers} loader workers; torch {torch.__version__}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=20, help="timed seconds per row")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per row")
    parser.add_argument(
        "--images", type=int, default=32768, help="JPEGs in the folder (1024 distinct at most)"
    )
    parser.add_argument("--workers", type=int, default=max(1, _cores() - 1))
    parser.add_argument(
        "--decoders",
        default="pil,torchvision,dali",
        help="comma-separated data.decoder values to time on the JPEG folder",
    )
    parser.add_argument(
        "--data-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe override for nestedtrain's loaders, e.g. data.auto_augment=rand-m9-mstd0.5",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="times each loader is timed, in rotation"
    )
    parser.add_argument("--resize-multiple", type=int, default=8, help="ST++ side multiple")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--doc", default=str(REPO / "docs" / "gpu_check.md"))
    parser.add_argument(
        "--parts",
        default="train,data,feed,ranks",
        help="comma-separated: train, data (the loaders), feed (CT fed by the loader), ranks",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    parts = set(args.parts.split(","))
    print(f"Estimated time: {estimate_seconds(args, parts) / 60:.1f} minutes", flush=True)
    print(machine(args, device), flush=True)
    configure_cuda(device)  # cuDNN benchmark and TF32 on CUDA, as nestedtrain's runs
    start = time.perf_counter()
    train_rows = synthetic(args, device) if "train" in parts else []
    data_rows = data_path(args, device, parts) if "data" in parts else []
    ranks = ranks_line(device) if "ranks" in parts else ""
    lines = _report(args, device, train_rows, data_rows, ranks, time.perf_counter() - start)
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(args.doc).write_text("\n".join(lines))
    print("\n".join(lines))


def _report(args, device, train_rows, data_rows, ranks: str, seconds: float) -> list[str]:
    """The doc's lines: the command, the machine, the tables, the wall time."""
    plain = train_rows[0][1] if train_rows else 1.0
    threads = os.environ.get("OMP_NUM_THREADS")
    command = (
        "" if threads is None else f"OMP_NUM_THREADS={threads} "
    ) + "python bench/gpu_check.py "
    command += " ".join(shlex.quote(a) for a in sys.argv[1:])
    return [
        "# GPU check: training speed and the data path",
        "",
        f"Command: `{command}`",
        "",
        machine(args, device),
        "",
        f"{args.model} at {args.img_size} px, batch {args.batch_size}; each row timed for at "
        f"least {args.seconds:g} s after {args.warmup} warm-up steps (ST++: and every input "
        f"side, multiples of {args.resize_multiple}), peak memory of the timed steps; "
        f"loaders timed after workers × {PREFETCH} batches; "
        f"{'bf16 autocast, channels-last' if device.type == 'cuda' else 'float32'}.",
        "",
        *(
            ["| synthetic batches | images/s | vs plain loop | peak GiB |", "|---|---|---|---|"]
            if train_rows
            else []
        ),
        *(f"| {n} | {r:.0f} | {r / plain:.2f} | {m} |" for n, r, m in train_rows),
        "",
        *(
            [
                f"| JPEG folder ({args.images} images, {args.workers} workers) | images/s"
                + (f", median of {args.repeats} (range)" if args.repeats > 1 else "")
                + " |",
                "|---|---|",
            ]
            if data_rows
            else []
        ),
        *(f"| {n} | {r} |" for n, r in data_rows),
        *(
            [
                "",
                "With `--workers 0` and one thread (OMP_NUM_THREADS=1) each row runs on one core:",
                "its images/s are images/s per CPU core.",
            ]
            if data_rows and args.workers == 0
            else []
        ),
        "",
        ranks,
        "",
        f"Wall time: {seconds:.0f} s.",
        "",
    ]


if __name__ == "__main__":
    main()
