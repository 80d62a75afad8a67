"""ST's shared-prefix step: what it computes equals the plain step, in less time and no more
memory; it falls back to the plain step where it does not apply."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import ListStageNet, make_model, perturb_norms
from peak_memory import PeakMemory
from torch import nn

import nestedtrain as nt
from nestedtrain.methods import CommonTraining, StimulativeTraining

# (model, input side, in_chans)
MODELS = {
    "resnet20": lambda: (perturb_norms(nt.create_model("resnet20", num_classes=10)), 16, 3),
    "resnet32": lambda: (perturb_norms(nt.create_model("resnet32", num_classes=10)), 16, 3),
    "timm-resnet18": lambda: make_model("timm-resnet18")[:2] + (3,),
    "timm-resnet50": lambda: make_model("timm-resnet50")[:2] + (3,),
}


def _batch(side: int, in_chans: int = 3, n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, in_chans, side, side, generator=g), torch.randint(0, 7, (n,), generator=g)


def _step(model: nn.Module, images, labels, share: bool, **options):
    """One ST step on a copy of ``model``; returns the copy, the step's info and the step."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    st = StimulativeTraining(
        model, opt, share_prefix=share, generator=torch.Generator().manual_seed(5), **options
    )
    info = st.step(images, labels)
    return model, info, st


def _assert_same_step(plain, shared) -> None:
    (a, info_a, st_a), (b, info_b, st_b) = plain, shared
    assert info_a["subnets"] == info_b["subnets"]
    for key in ("loss", "ce", "kl"):
        torch.testing.assert_close(info_a[key], info_b[key], rtol=1e-5, atol=1e-6)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            # Float32 sums in another order: the shared path adds the main network's and the
            # sub-networks' gradients at the cut activation, the plain one in each weight's
            # gradient. That differs by ~1e-6 of the largest gradient; a sub-network's
            # missing or doubled contribution differs by its whole size.
            scale = float(p.grad.abs().max())
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5 * scale, msg=name)
    for (name, u), (_, v) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(u, v), name  # BN running statistics: bit-identical
    assert torch.equal(st_a.generator.get_state(), st_b.generator.get_state())


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("num_subnets", [1, 4])
def test_shared_step_equals_plain_step(name, num_subnets):
    model, side, chans = MODELS[name]()
    images, labels = _batch(side, chans)
    plain = _step(model, images, labels, False, num_subnets=num_subnets)
    shared = _step(model, images, labels, True, num_subnets=num_subnets)
    assert plain[2].shared_prefix == "off: st.share_prefix is off"
    assert shared[2].shared_prefix.startswith("on:")
    _assert_same_step(plain, shared)


def test_shared_step_is_the_same_computation_in_float64():
    # In float64 the summation order no longer shows: both steps agree to ~1e-13.
    model, side, chans = MODELS["resnet32"]()
    model = model.double()
    images, labels = _batch(side, chans)
    a, _, _ = _step(model, images.double(), labels, False, num_subnets=4)
    b, _, _ = _step(model, images.double(), labels, True, num_subnets=4)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize(
    "options",
    [
        # KL⁻ with the main CE on normalised logits, the ST++ recipe's losses
        dict(kl_norm="std", norm_main_ce=True, amplitude=2.0),
        # sub-networks trained on the labels
        dict(target="label"),
        # unordered sub-networks: a trie that is not a chain of stage depths
        dict(sampler=nt.StochasticSampler, p=0.5),
        # one side per step: either the main network's input or shared among themselves
        dict(resize=[0.5, 1.0], resize_per="step"),
        # a side per sub-network: only the ones drawn at full size share with the main one
        dict(resize=[0.75, 1.0], resize_per="subnet"),
    ],
    ids=["kl-minus", "label", "stochastic", "resize-per-step", "resize-per-subnet"],
)
def test_shared_step_equals_plain_step_for_st_plus_plus_options(options):
    model, side, chans = MODELS["resnet32"]()
    options = dict(options)
    if options.get("sampler") is nt.StochasticSampler:
        options["sampler"] = nt.StochasticSampler(model, p=options.pop("p"))
    for seed in range(3):  # several steps' worth of draws, sizes included
        images, labels = _batch(side, chans, seed=seed)
        plain = _step(model, images, labels, False, num_subnets=4, **options)
        shared = _step(model, images, labels, True, num_subnets=4, **options)
        _assert_same_step(plain, shared)


def test_a_sub_network_equal_to_the_main_network_shares_its_head():
    model, side, chans = MODELS["resnet20"]()
    full = nt.Subnet.full(model)

    class Always:
        def sample(self, generator):
            torch.randint(2, (1,), generator=generator)  # draws like a sampler
            return full

    images, labels = _batch(side, chans)
    _assert_same_step(
        _step(model, images, labels, False, num_subnets=2, sampler=Always()),
        _step(model, images, labels, True, num_subnets=2, sampler=Always()),
    )


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "timm-resnet18"])
@pytest.mark.parametrize("num_subnets", [1, 6])
def test_shared_step_peak_memory_is_no_higher_than_the_plain_step(name, num_subnets):
    model, side, chans = MODELS[name]()
    images, labels = _batch(side * 2, chans, n=64)

    def peak(make) -> int:
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        method = make(m, opt)
        method.step(images, labels)  # first step: gradients allocated, split built
        with PeakMemory() as memory:
            method.step(images, labels)
        return memory.peak

    def st(share: bool):
        return lambda m, o: StimulativeTraining(
            m, o, num_subnets=num_subnets, share_prefix=share, generator=torch.Generator()
        )

    ct = peak(lambda m, o: CommonTraining(m, o))
    plain, shared = peak(st(False)), peak(st(True))
    print(name, num_subnets, ct, plain, shared, shared / ct, shared / plain)
    # On top of the plain step's activations, the shared one holds the gradient of the
    # activation where a sub-network branches off until its prefix is backpropagated.
    assert shared <= 1.05 * plain, (shared, plain)
    assert shared <= 1.1 * ct, (shared, ct)


def test_peak_memory_counts_what_is_alive():
    with PeakMemory() as memory:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 bytes
        b = torch.empty(500, dtype=torch.float32)
        del a
        c = torch.empty(100, dtype=torch.float32)
    assert memory.peak == 6000
    assert memory.current == 2400
    del b, c


# ------------------------------------------------------------------------- fallbacks
def test_a_model_that_cannot_split_runs_the_plain_step(caplog):
    nt.declare_stages(ListStageNet, ["stage"], skippable=[[0, 1, 2]])
    torch.manual_seed(0)
    model = perturb_norms(ListStageNet())
    images, labels = _batch(8, 1)
    with caplog.at_level(logging.INFO, logger="nestedtrain"):
        shared = _step(model, images, labels, True, num_subnets=2)
    assert shared[2].shared_prefix.startswith("off: the model's forward cannot be split")
    assert [r.getMessage() for r in caplog.records] == [
        f"ST shared prefix {shared[2].shared_prefix}"
    ]
    _assert_same_step(_step(model, images, labels, False, num_subnets=2), shared)


def test_a_model_with_drop_path_shares_prefixes_with_the_main_networks_masks():
    """With drop-path the shared step runs (a sub-network's prefix carries the main network's
    masks): the same seed gives the same step, another seed other masks, and evaluation draws
    none."""
    torch.manual_seed(0)
    model = perturb_norms(nt.create_model("resnet20", num_classes=7, drop_path_rate=0.5))
    images, labels = _batch(16)
    torch.manual_seed(1)
    shared = _step(model, images, labels, True, num_subnets=2)
    assert shared[2].shared_prefix.startswith("on: ")
    drops = [m for m in model.modules() if type(m).__name__ == "DropPath"]
    assert drops, "drop_path_rate made no DropPath"
    torch.manual_seed(1)
    again = _step(model, images, labels, True, num_subnets=2)
    _assert_same_step(shared, again)  # same seed, same step
    torch.manual_seed(2)
    other = _step(model, images, labels, True, num_subnets=2)
    assert not torch.equal(other[1]["ce"], shared[1]["ce"])  # the masks are drawn
    model.eval()
    with torch.no_grad():  # off in evaluation
        assert torch.equal(model(images), model(images))


def test_reference_bn_policy_runs_the_plain_step():
    model, side, chans = MODELS["resnet20"]()
    images, labels = _batch(side, chans)
    shared = _step(model, images, labels, True, num_subnets=2, bn="reference")
    assert shared[2].shared_prefix.startswith("off: st.bn=reference")
    _assert_same_step(_step(model, images, labels, False, num_subnets=2, bn="reference"), shared)
