"""Shared-prefix sub-network evaluation against one-at-a-time evaluation, side by side.

Both evaluate the same sub-networks of the same model on the same data, each with BN
statistics re-estimated from the same calibration images, and must agree exactly (checked);
the script prints the wall time of each and their ratio, as a Markdown table row.

    python bench/bench_analysis.py --model resnet56 --subnets sample:81 --threads 1

Results and the commands that made them: docs/analysis_speed.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

import nestedtrain as nt
from nestedtrain.data import DataConfig, build_data
from nestedtrain.elastic import subnets_from_spec
from nestedtrain.evaluation import evaluate_subnets

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from oracle import evaluate_one_at_a_time  # noqa: E402 - the tests' one-at-a-time oracle


def _model(name: str, in_chans: int, num_classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = nt.create_model(name, num_classes=num_classes, in_chans=in_chans)
    # Random BN affine parameters, so that no block is close to an identity.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in nt.bn.batchnorms(model):
            m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--subnets", default="all", help="all | sample:N (of the ordered space)")
    parser.add_argument("--calib-images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip-naive", action="store_true", help="time the shared pass only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = build_data(
        DataConfig(name=args.data, calib_images=args.calib_images),
        batch_size=128,
        seed=args.seed,
        device=device,
    )
    model = _model(args.model, data.in_chans, data.num_classes, args.seed).to(device)
    subnets = subnets_from_spec(model, args.subnets, seed=args.seed)

    def eval_fn():
        return data.eval_batches("test", batch_size=args.batch_size)

    def calib_fn():
        return data.calibration_batches(batch_size=args.batch_size)

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    shared, shared_s = timed(lambda: evaluate_subnets(model, subnets, eval_fn, calib_fn))
    if args.skip_naive:
        naive_s, ratio, same = None, None, "not run"
    else:
        naive, naive_s = timed(lambda: evaluate_one_at_a_time(model, subnets, eval_fn, calib_fn))
        same = "yes" if naive == shared else "NO"
        ratio = naive_s / shared_s
        if naive != shared:
            print("shared-prefix results differ from one-at-a-time ones", file=sys.stderr)
    command = "python bench/bench_analysis.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    mean_acc = sum(r["acc"] for r in shared) / len(shared)
    print(
        "| model | sub-networks | eval / calib images | one at a time (s) | shared (s) | "
        "speed-up | identical | device, threads |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.model} | {len(subnets)} | {data.n_test} / {min(args.calib_images, data.n_train)} | "
        f"{'-' if naive_s is None else f'{naive_s:.1f}'} | {shared_s:.1f} | "
        f"{'-' if ratio is None else f'{ratio:.1f}x'} | {same} | {device.type}, "
        f"{torch.get_num_threads()} |"
    )
    print(f"\ncommand: {command}\nmean sub-network accuracy {mean_acc:.2f}%")
    return 0 if same != "NO" else 1


if __name__ == "__main__":
    sys.exit(main())
