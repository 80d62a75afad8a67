"""method=sandwich: the main network, the space's smallest sub-network and n random ones, each
distilled from the main network's output; on ST's shared-prefix path, through the CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import perturb_norms

import nestedtrain as nt
from nestedtrain.cli import main
from nestedtrain.elastic import Subnet
from nestedtrain.elastic.sampling import OrderedSampler, StochasticSampler
from nestedtrain.methods import SandwichTraining, StimulativeTraining

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_the_smallest_subnet_of_each_space():
    model = nt.create_model("resnet20", num_classes=10)
    assert OrderedSampler(model).smallest() == Subnet([(0,), (0,), (0,)])
    assert OrderedSampler(model, max_drop=1).smallest() == Subnet([(0, 1), (0, 1), (0, 1)])
    resnet18 = nt.create_model("resnet18", num_classes=10)
    # stage 1 of timm's resnet18 has two skippable blocks; the later stages' first block is a
    # down-sampling one that always runs
    assert StochasticSampler(resnet18).smallest() == Subnet([(0,), (0,), (0,), (0,)])


def _step(model, images, labels, share: bool, **options):
    model = copy.deepcopy(model)
    step = SandwichTraining(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        share_prefix=share,
        generator=torch.Generator().manual_seed(3),
        **options,
    )
    return step, step.step(images, labels), model


@pytest.mark.parametrize("n", [0, 2])
def test_a_step_is_main_smallest_and_n_random_on_both_paths(n):
    torch.manual_seed(0)
    model = perturb_norms(nt.create_model("resnet20", num_classes=10))
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
    step, info, shared = _step(model, images, labels, True, num_subnets=n)
    assert step.shared_prefix.startswith("on: ")
    assert info["subnets"][0] == "1-1-1" and len(info["subnets"]) == n + 1
    # the random draws are ST's own, from the same generator
    st = StimulativeTraining(
        copy.deepcopy(model),
        torch.optim.SGD(model.parameters(), lr=0.1),
        num_subnets=n,
        generator=torch.Generator().manual_seed(3),
    )
    assert info["subnets"][1:] == [str(s) for s, _ in st._draw(16)]
    _, plain_info, plain = _step(model, images, labels, False, num_subnets=n)
    assert plain_info["subnets"] == info["subnets"]
    for key in ("loss", "ce", "kl"):
        torch.testing.assert_close(plain_info[key], info[key], rtol=1e-5, atol=1e-6)
    # every term has weight λ: the loss is CE + λ·Σ, with n + 1 terms
    expected = info["ce"] + info["kl"] * (n + 1)
    torch.testing.assert_close(info["loss"], expected, rtol=1e-5, atol=1e-6)
    for (name, p), (_, q) in zip(plain.named_parameters(), shared.named_parameters()):
        scale = float(p.grad.abs().max()) if p.grad is not None else 1.0
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_smallest_sees_the_smallest_side_with_resize():
    model = nt.create_model("resnet20", num_classes=10)
    step = SandwichTraining(
        model, torch.optim.SGD(model.parameters(), lr=0.1), num_subnets=1, resize=[0.5, 1.0]
    )
    drawn = step._draw(28)
    assert drawn[0] == (Subnet([(0,), (0,), (0,)]), 14) and 14 <= drawn[1][1] <= 28
    step.resize_multiple = 8
    assert step._draw(28)[0][1] == 16


def test_cli_trains_sandwich_and_evaluates_its_subnets(tmp_path, one_thread):
    out = tmp_path / "run"
    argv = ["train", str(RECIPES / "digits_st.yaml"), "method=sandwich", "st.num_subnets=1"]
    argv += ["epochs=1", "data.train_subset=256", "eval.subnets=sample:4", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "sandwich" and len(summary["subnets"]) == 4
    assert summary["st_shared_prefix"].startswith("on: ")
    config = nt.load_config(out / "config.yaml")
    assert (config.st.lam, config.st.kl_norm, config.st.num_subnets) == (1.0, "none", 1)
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["kl"] > 0 and line["loss"] > line["ce"]
