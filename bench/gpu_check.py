"""Images/s and peak memory of CT, ST and ST++ against a plain PyTorch loop, for a lent GPU.

    python bench/gpu_check.py [--model resnet50] [--img-size 224] [--batch-size 128]
        [--steps 20] [--warmup 5] [--images 1536] [--workers N] [--device cuda]
        [--doc docs/gpu_check.md]

Three parts, one process, about 5 minutes on one GPU at the defaults:

1. **Synthetic batches** (random images already on the device): a plain PyTorch loop (timm
   model, CE, SGD, the same autocast and channels-last) against nestedtrain's CT, ST (one
   sub-network) and ST++ (six sub-networks, KL⁻, resized inputs, the ``space3`` space of the
   ImageNet recipes) steps; bf16 autocast and channels-last on CUDA. Images/s of the main
   network's batch, and the peak memory allocated on the device.
2. **A JPEG folder** the script writes (``--images`` random-noise JPEGs of 300-500 px, as an
   ImageFolder tree): images/s of torchvision's reference pipeline (ImageFolder,
   RandomResizedCrop, flip, ToTensor, Normalize, a DataLoader with ``--workers``), of
   nestedtrain's loader alone with each ``--decoders`` value (``data.decoder``: PIL in the
   workers, torchvision's ``decode_jpeg`` or DALI on the device), of the host half of the last
   two alone (read, check; no decode), and of CT steps fed by each: what the data path gives a
   GPU with this machine's cores. ``--repeats N`` times each loader N times in rotation.
3. **Ranks**: not run here (NCCL needs a GPU per rank); the doc says so, and that
   tests/test_distributed.py checks BN agreement with 2 gloo processes on the CPU.

Writes the numbers, the device and the exact command to ``--doc``. On the CPU with tiny sizes
(``--device cpu --model resnet18 --img-size 64 ...``) it checks that the script runs;
tests/test_bench_scripts.py does that.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import nestedtrain as nt
from nestedtrain.data import build_data
from nestedtrain.elastic.sampling import build_sampler
from nestedtrain.engine.config import load_config
from nestedtrain.engine.distributed import configure_cuda
from nestedtrain.methods import CommonTraining, Precision, StimulativeTraining

REPO = Path(__file__).resolve().parents[1]
SPACE3 = {name: "space3" for name in ("resnet50", "resnet101", "resnet152")}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


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


def _timed(step: Callable[[int], None], args, device: torch.device) -> tuple[float, str]:
    """Images/s of ``step`` over ``args.steps`` steps after ``args.warmup``, and peak GiB."""
    _peak_reset(device)
    for i in range(args.warmup):
        step(i)
    _sync(device)
    start = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    _sync(device)
    seconds = time.perf_counter() - start
    return args.steps * args.batch_size / seconds, _peak_gib(device)


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
    rows = []

    rows.append(
        ("plain PyTorch loop", *_timed(_plain_step(args, device, images, labels), args, device))
    )

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
        model = _model(args, device)
        optimizer = _optimizer(model)
        method = build(model, optimizer, Precision(device, amp=amp, dtype="bfloat16"))

        def step(_: int, method=method, optimizer=optimizer) -> None:
            info = method.step(images, labels)
            method.precision.step(optimizer)
            optimizer.zero_grad(set_to_none=True)
            method.after_optimizer_step(info)

        rows.append((name, *_timed(step, args, device)))
    return rows


def write_jpegs(root: Path, count: int, classes: int = 8) -> None:
    """``count`` random-noise JPEGs of 300-500 px (quality 90) in ``root/{train,val}/cK``."""
    rng = np.random.default_rng(0)
    for split, n in (("train", count), ("val", max(classes, count // 8))):
        for i in range(n):
            folder = root / split / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            h, w = rng.integers(300, 501, size=2)
            # smooth noise: upsampled, so the JPEGs are about as large as photographs
            small = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((int(w), int(h)), Image.BILINEAR)
            image.save(folder / f"{i}.JPEG", quality=90)


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
        persistent_workers=False,
    )
    return _loader_rate(iter(loader))


def _loader_rate(batches) -> float:
    """Images/s over every batch after the first (worker start-up excluded)."""
    batches = iter(batches)
    next(batches)
    start, seen = time.perf_counter(), 0
    for images, _ in batches:
        seen += len(images)
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
    )
    return _loader_rate((batch.labels, None) for batch in loader)


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
        value = _loader_rate(data.train_batches(0))
        _sync(device)
        return value

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
    """Images/s of CT steps fed by nestedtrain's loader (the GPU waits when data is slow)."""
    model = _model(args, device)
    optimizer = _optimizer(model)
    amp = device.type == "cuda"
    method = CommonTraining(model, optimizer, precision=Precision(device, amp=amp))
    batches = iter(data.train_batches(0))
    next(batches)
    _sync(device)
    start, seen = time.perf_counter(), 0
    for images, labels in batches:
        if amp:
            images = images.contiguous(memory_format=torch.channels_last)
        info = method.step(images, labels)
        method.precision.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        method.after_optimizer_step(info)
        seen += images.shape[0]
    _sync(device)
    return seen / (time.perf_counter() - start)


def ranks_line(device: torch.device) -> str:
    """What this script says of DDP's BN agreement: NCCL needs a GPU per rank, and the
    2-process check with gloo on the CPU is tests/test_distributed.py's."""
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    return (
        f"DDP BN agreement not run here: {count} GPU(s), NCCL needs one per rank. "
        "tests/test_distributed.py checks it with 2 gloo processes on the CPU."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--images", type=int, default=1536, help="JPEGs to write and read")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--decoders",
        default="pil,torchvision,dali",
        help="comma-separated data.decoder values to time on the JPEG folder",
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
    configure_cuda(device)  # cuDNN benchmark and TF32 on CUDA, as nestedtrain's runs
    start = time.perf_counter()
    parts = set(args.parts.split(","))
    train_rows = synthetic(args, device) if "train" in parts else []
    data_rows = data_path(args, device, parts) if "data" in parts else []
    ranks = ranks_line(device) if "ranks" in parts else ""
    plain = train_rows[0][1] if train_rows else 1.0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    threads = os.environ.get("OMP_NUM_THREADS")
    command = (
        "" if threads is None else f"OMP_NUM_THREADS={threads} "
    ) + "python bench/gpu_check.py "
    command += " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        "# GPU check: training speed and the data path",
        "",
        f"Command: `{command}`",
        "",
        f"Device: {device} ({name or platform.machine()}), {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}; {args.model} at {args.img_size} px, batch "
        f"{args.batch_size}, {args.steps} timed steps after {args.warmup}; "
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
        f"Wall time: {time.perf_counter() - start:.0f} s.",
        "",
    ]
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(args.doc).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
