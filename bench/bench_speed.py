"""Time per training epoch: ST (1 sub-network) vs CT, and our CT vs a plain PyTorch loop.

All three run side by side in one process, one epoch of each in turn, so a busy machine slows
them alike; the first round is warm-up and the median of the rest is reported. Writes a
Markdown table with the exact command into docs/benchmarks.md.

    python bench/bench_speed.py [--epochs 3] [--subset 10000] [--model resnet32]
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import nestedtrain as nt
from nestedtrain.engine.trainer import Trainer
from nestedtrain.flops import count_flops

ROOT = Path(__file__).resolve().parent.parent


def plain_loop_factory(model_name: str, subset: int, batch_size: int, lr: float, epochs: int):
    """A minimal hand-written loop on the same images: uint8 tensors, pad-crop + flip by
    tensor ops, SGD Nesterov with cosine decay. No nestedtrain code runs in its epochs."""
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
            x = F.pad(x, (4, 4, 4, 4))
            i, j = torch.randint(0, 9, (2,), generator=g).tolist()
            x = x[:, :, i : i + 28, j : j + 28]
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
    method: str, model_name: str, subset: int, batch_size: int, lr: float, epochs: int
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
        ],
    )
    trainer = Trainer(cfg, ROOT / "runs" / f"bench-{method}")
    return lambda e: trainer.train_epoch(e, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--subset", type=int, default=10000)
    parser.add_argument("--model", default="resnet32")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()

    # ST's cost bound from FLOPs: the main network plus one uniformly drawn sub-network.
    model = nt.create_model(args.model, num_classes=10, in_chans=1)
    main_flops = count_flops(model, 28, 1)
    space = nt.OrderedSampler(model).all()
    sub_flops = [count_flops(model, 28, 1, subnet=s) for s in space]
    flops_bound = 1 + sum(sub_flops) / len(sub_flops) / main_flops

    runs = {
        "plain PyTorch loop": plain_loop_factory(
            args.model, args.subset, args.batch_size, 0.1, args.epochs
        ),
        "nestedtrain CT": ours_factory(
            "ct", args.model, args.subset, args.batch_size, 0.1, args.epochs
        ),
        "nestedtrain ST (1 sub-network)": ours_factory(
            "st", args.model, args.subset, args.batch_size, 0.1, args.epochs
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for epoch in range(args.epochs):
        for name, run in runs.items():
            start = time.perf_counter()
            run(epoch)
            times[name].append(time.perf_counter() - start)
            print(f"epoch {epoch} {name}: {times[name][-1]:.1f} s", file=sys.stderr, flush=True)

    steady = {name: statistics.median(t[1:]) for name, t in times.items()}
    plain, ct, st = steady.values()
    command = "python bench/bench_speed.py " + " ".join(sys.argv[1:])
    lines = [
        "# Training speed on the CPU",
        "",
        f"Command: `{command.strip()}` (also `make bench`)",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}, Python {platform.python_version()}. Fashion-MNIST, "
        f"{args.subset} training images, {args.model}, batch {args.batch_size}; one epoch of each "
        f"in turn for {args.epochs} rounds, the first round dropped as warm-up, median of the rest.",
        "",
        "| loop | seconds per epoch (each round) | steady median |",
        "|---|---|---|",
    ]
    for name, t in times.items():
        lines.append(f"| {name} | {', '.join(f'{x:.1f}' for x in t)} | {steady[name]:.1f} |")
    lines += [
        "",
        f"- ST ÷ CT: **{st / ct:.2f}×**. Its FLOPs bound, 1 + mean sub-network FLOPs ÷ main "
        f"FLOPs over the {len(space)} ordered sub-networks drawn uniformly, is {flops_bound:.2f}×; "
        "the ST paper reports about 1.4× on its GPUs.",
        f"- nestedtrain CT ÷ plain loop: **{ct / plain:.3f}×**",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
