"""Time per training epoch: ST (1 sub-network) with and without the shared prefix vs CT, and
our CT vs a plain PyTorch loop; peak step memory; shared vs plain gradients.

All four run side by side in one process, one epoch of each in turn, so a busy machine slows
them alike; the first round is warm-up and the median of the rest is reported. Each ratio is
printed next to its FLOPs bound. Every run also checks that the shared-prefix step's gradients
equal the plain step's, and measures the peak memory of a CT step and of ST steps with 1 and 6
sub-networks. Writes (or replaces) the model's section of docs/benchmarks.md, with the command.

    python bench/bench_speed.py [--epochs 3] [--subset 10000] [--model resnet32]
        [--img-size 28] [--space space3] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import nestedtrain as nt
from nestedtrain.elastic import ModelSplit, run_path
from nestedtrain.engine.trainer import Trainer
from nestedtrain.flops import count_flops
from nestedtrain.methods import CommonTraining, StimulativeTraining

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from peak_memory import PeakMemory  # noqa: E402 - the tests' memory meter

ROOT = Path(__file__).resolve().parent.parent


def plain_loop_factory(
    model_name: str, subset: int, batch_size: int, lr: float, epochs: int, img_size: int = 28
):
    """A minimal hand-written loop on the same images: uint8 tensors, pad-crop + flip by
    tensor ops (after a bilinear resize to ``img_size``), SGD Nesterov with cosine decay. No
    nestedtrain code runs in its epochs."""
    from nestedtrain.data.datasets import load_arrays

    arrays = load_arrays("fashion-mnist", "data")
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(arrays.train_images), generator=g)[:subset]
    images = torch.from_numpy(arrays.train_images)[pick]
    labels = torch.from_numpy(arrays.train_labels)[pick].long()
    torch.manual_seed(0)
    model = nt.create_model(model_name, num_classes=10, in_chans=1)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = len(images) // batch_size
    total = steps * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total))
    )

    def epoch(e: int) -> None:
        model.train()
        order = torch.randperm(len(images), generator=g)
        for s in range(steps):
            idx = order[s * batch_size : (s + 1) * batch_size]
            x = images[idx].float().div_(255)
            if img_size != x.shape[-1]:
                x = F.interpolate(x, size=(img_size, img_size), mode="bilinear")
            x = F.pad(x, (4, 4, 4, 4))
            i, j = torch.randint(0, 9, (2,), generator=g).tolist()
            x = x[:, :, i : i + img_size, j : j + img_size]
            if torch.rand(1, generator=g).item() < 0.5:
                x = x.flip(3)
            x = (x - 0.2860) / 0.3530
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

    return epoch


def ours_factory(
    method: str,
    model_name: str,
    subset: int,
    batch_size: int,
    lr: float,
    epochs: int,
    extra: list[str],
):
    cfg = nt.load_config(
        None,
        [
            f"method={method}",
            f"model.name={model_name}",
            "data.name=fashion-mnist",
            f"data.train_subset={subset}",
            "data.val_size=0",
            f"batch_size={batch_size}",
            f"optim.lr={lr}",
            f"epochs={epochs}",
            "eval.subnets=none",
            *extra,
        ],
    )
    name = "-".join([method, model_name, *extra]).replace("=", "_").replace("/", "_")
    trainer = Trainer(cfg, ROOT / "runs" / "bench" / name)
    return trainer, lambda e: trainer.train_epoch(e, progress=False)


def flops_bounds(model: torch.nn.Module, img_size: int, space) -> tuple[float, float, int]:
    """ST's cost bound from FLOPs with one uniformly drawn sub-network: ``1 + mean sub-network
    FLOPs / main FLOPs`` when each sub-network runs whole, and ``1 + mean FLOPs of what it
    does not share with the main network / main FLOPs`` when the shared prefix (stem and the
    blocks before the first one where their paths differ) runs once."""
    stages = nt.find_stages(model)
    probe = torch.zeros(2, 1, img_size, img_size)
    main = count_flops(model, img_size, 1)
    # FLOPs of the stem and of each block, from one counted forward of the main network.
    split = ModelSplit(model, stages, probe)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        with split.installed():
            split.stem(probe[:1])
    stem = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model.eval()
            model(probe[:1])
    per_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    block = {
        ("block", s, b): per_module.get(f"{type(model).__name__}.{stage.name}.{key}", 0)
        for s, stage in enumerate(stages)
        for b, key in enumerate(stage.keys)
    }
    main_path = run_path(nt.Subnet.full(model))
    space_subnets = nt.OrderedSampler(model, max_drop=space).all()
    whole, rest = [], []
    for subnet in space_subnets:
        path = run_path(subnet)
        flops = count_flops(model, img_size, 1, subnet=subnet)
        common = 0
        while common < len(path) and path[common] == main_path[common]:
            common += 1
        whole.append(flops)
        rest.append(flops - stem - sum(block[key] for key in path[:common]))
    mean = statistics.mean
    return 1 + mean(whole) / main, 1 + mean(rest) / main, len(space_subnets)


def check_equal_and_memory(trainer: Trainer, num_subnets: int) -> dict:
    """One ST step with and without sharing on the same batch of real images: the largest
    gradient difference (relative to each tensor's largest gradient) in float64, asserted
    below 1e-9, and in float32 (float summation order: reported); and the peak memory of a CT,
    a plain ST and a shared ST step in float32."""
    images, labels = next(iter(trainer.data.train_batches(0)))
    space = trainer.cfg.st.space

    def make(kind: str, model):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if kind == "ct":
            return CommonTraining(model, opt)
        return StimulativeTraining(
            model,
            opt,
            num_subnets=num_subnets,
            sampler=nt.OrderedSampler(model, max_drop=space),
            share_prefix=kind == "shared",
            generator=torch.Generator().manual_seed(0),
        )

    def gradients(kind: str, dtype: torch.dtype) -> list[torch.Tensor]:
        model = copy.deepcopy(trainer.model).to(dtype)
        make(kind, model).step(images.to(dtype), labels)
        return [p.grad for p in model.parameters() if p.grad is not None]

    def worst(dtype: torch.dtype) -> float:
        pairs = zip(gradients("plain", dtype), gradients("shared", dtype))
        return max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)) for a, b in pairs)

    exact, float32 = worst(torch.float64), worst(torch.float32)
    assert exact < 1e-9, f"shared-prefix gradients differ from the plain step's by {exact:.2e}"
    peaks = {}
    for kind in ("ct", "plain", "shared"):
        model = copy.deepcopy(trainer.model)
        method = make(kind, model)
        method.step(images, labels)  # gradients allocated, split built
        with PeakMemory() as memory:
            method.step(images, labels)
        peaks[kind] = memory.peak
    return {"float64": exact, "float32": float32, **peaks}


def _replace_section(path: Path, title: str, body: list[str]) -> None:
    """Write ``## title`` with ``body`` into the Markdown file, keeping its other sections."""
    head = ["# Training speed on the CPU", ""]
    sections: dict[str, str] = {}
    if path.exists():
        parts = path.read_text().split("\n## ")
        for part in parts[1:]:
            name, _, rest = part.partition("\n")
            sections[name] = rest
    sections[title] = "\n".join(body)
    text = "\n".join(head) + "".join(f"\n## {k}\n{v.rstrip()}\n" for k, v in sections.items())
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--subset", type=int, default=10000)
    parser.add_argument("--model", default="resnet32")
    parser.add_argument("--img-size", type=int, default=28)
    parser.add_argument("--space", default=None, help="ST sampling space, e.g. space3")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    command = "python bench/bench_speed.py " + " ".join(sys.argv[1:])

    model = nt.create_model(args.model, num_classes=10, in_chans=1)
    plain_bound, shared_bound, space_size = flops_bounds(model, args.img_size, args.space)

    extra = [f"data.img_size={args.img_size}"] if args.img_size != 28 else []
    st_extra = extra + ([f"st.space={args.space}"] if args.space else [])
    factory = functools.partial(
        ours_factory,
        model_name=args.model,
        subset=args.subset,
        batch_size=args.batch_size,
        lr=0.1,
        epochs=args.epochs,
    )
    ct_trainer, ct_epoch = factory("ct", extra=extra)
    st_trainer, st_epoch = factory("st", extra=st_extra + ["st.share_prefix=false"])
    _, shared_epoch = factory("st", extra=st_extra)
    runs = {
        "plain PyTorch loop": plain_loop_factory(
            args.model, args.subset, args.batch_size, 0.1, args.epochs, args.img_size
        ),
        "nestedtrain CT": ct_epoch,
        "nestedtrain ST, 1 sub-network, whole": st_epoch,
        "nestedtrain ST, 1 sub-network, shared prefix": shared_epoch,
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for epoch in range(args.epochs):
        for name, run in runs.items():
            start = time.perf_counter()
            run(epoch)
            times[name].append(time.perf_counter() - start)
            print(f"epoch {epoch} {name}: {times[name][-1]:.1f} s", file=sys.stderr, flush=True)
    checks = {n: check_equal_and_memory(st_trainer, n) for n in (1, 6)}

    steady = {name: statistics.median(t[1:]) for name, t in times.items()}
    plain, ct, st, shared = steady.values()
    space = args.space or "every ordered sub-network"
    body = [
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}, Python {platform.python_version()}. Fashion-MNIST at "
        f"{args.img_size} px, {args.subset} training images, {args.model}, batch "
        f"{args.batch_size}, sampling space: {space} ({space_size} sub-networks); one epoch of "
        f"each in turn for {args.epochs} rounds, the first round dropped as warm-up, median of "
        "the rest.",
        "",
        "| loop | seconds per epoch (each round) | steady median |",
        "|---|---|---|",
    ]
    for name, t in times.items():
        body.append(f"| {name} | {', '.join(f'{x:.1f}' for x in t)} | {steady[name]:.1f} |")
    body += [
        "",
        f"- ST ÷ CT, each sub-network whole: **{st / ct:.2f}×**; its FLOPs bound (1 + mean "
        f"sub-network FLOPs ÷ main FLOPs, sub-networks drawn uniformly) is {plain_bound:.2f}×.",
        f"- ST ÷ CT, shared prefix computed once: **{shared / ct:.2f}×**; its FLOPs bound (1 + "
        f"mean FLOPs a sub-network does not share with the main network ÷ main FLOPs) is "
        f"{shared_bound:.2f}×.",
        f"- nestedtrain CT ÷ plain loop: **{ct / plain:.3f}×**",
        "",
        "Peak memory of one training step on one batch (tensor storage allocated inside the "
        "step and alive at once, `tests/peak_memory.py`), and the largest gradient "
        "difference between the shared and the plain ST step on that batch, relative to each "
        "tensor's largest gradient: in float64 (checked below 1e-9 on every run: the same "
        "computation) and in float32 (float summation order, with cancellation in the stem's "
        "gradient):",
        "",
        "| sub-networks per step | CT | ST whole | ST shared | shared ÷ CT | shared ÷ whole "
        "| gradient difference, float64 | float32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    mib = 2**20
    for n, c in checks.items():
        body.append(
            f"| {n} | {c['ct'] / mib:.0f} MiB | {c['plain'] / mib:.0f} MiB | "
            f"{c['shared'] / mib:.0f} MiB | {c['shared'] / c['ct']:.3f} | "
            f"{c['shared'] / c['plain']:.3f} | {c['float64']:.1e} | {c['float32']:.1e} |"
        )
    title = f"{args.model} at {args.img_size} px" + (f", {args.space}" if args.space else "")
    _replace_section(Path(args.out), title, body)
    print("\n".join(body))


if __name__ == "__main__":
    main()
