"""ST and ST++ steps (StimulativeTraining) on digits: the loss, the sub-network terms, BN policies,
options and their checks."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import perturb_norms

import nestedtrain as nt
from nestedtrain.methods import StimulativeTraining


def _steps(method, data, epochs=3):
    losses = []
    for epoch in range(epochs):
        for images, labels in data.train_batches(epoch):
            info = method.step(images, labels)
            method.optimizer.step()
            method.optimizer.zero_grad(set_to_none=True)
            method.after_optimizer_step(info)
            losses.append(info)
        method.on_epoch_end(epoch)
    return losses


def _method(kind, **kwargs):
    torch.manual_seed(0)
    model = nt.create_model("resnet20", num_classes=10, in_chans=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if kind == "ct":
        return nt.CommonTraining(model, optimizer)
    return nt.StimulativeTraining(model, optimizer, **kwargs)


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("ct", {}),
        ("st", {"lam": 1.0}),
        ("stpp", {"kl_norm": "std", "norm_main_ce": True, "num_subnets": 3, "resize": (0.43, 1.0)}),
    ],
)
def test_each_method_lowers_the_loss(digits, kind, kwargs):
    infos = _steps(_method("ct" if kind == "ct" else "st", **kwargs), digits, epochs=3)
    first = sum(i["ce"] for i in infos[:4]) / 4
    last = sum(i["ce"] for i in infos[-4:]) / 4
    assert last < 0.7 * first, (first, last)
    if kind != "ct":
        assert all(len(i["subnets"]) == kwargs.get("num_subnets", 1) for i in infos)
        # CE falls without the KL term too: the term shows in the sub-networks' KL to the main
        # network, which ends well below the one of the same draws trained (almost) without it
        alone = _steps(_method("st", **{**kwargs, "lam": 1e-8}), digits, epochs=3)
        epoch = len(infos) // 3
        kl, kl_alone = (sum(float(i["kl"]) for i in run[-epoch:]) for run in (infos, alone))
        assert kl < 0.85 * kl_alone, (kl, kl_alone)


def test_st_loss_is_ce_plus_lambda_kl(digits):
    images, labels = next(iter(digits.train_batches(0)))
    for lam, n in ((5.0, 1), (2.0, 3)):
        method = _method("st", lam=lam, num_subnets=n)
        perturb_norms(method.model)  # zero-init last BNs make every sub-network the main one
        info = method.step(images, labels)
        # loss terms stay tensors on the device: the step never waits for it
        assert all(isinstance(info[k], torch.Tensor) for k in ("loss", "ce", "kl"))
        loss, ce, kl = (float(info[k]) for k in ("loss", "ce", "kl"))
        assert kl > 0
        assert loss == pytest.approx(ce + lam * n * kl, rel=1e-6)


def test_n_subnets_mean_n_subnet_backwards(digits):
    images, labels = next(iter(digits.train_batches(0)))
    method = _method("st", num_subnets=4)
    backwards = []
    method.model.fc.weight.register_hook(lambda g: backwards.append(1))
    info = method.step(images, labels)
    assert len(backwards) == 1 + 4 and len(info["subnets"]) == 4


def test_lambda_zero_and_start_epoch_mean_plain_ce(digits):
    images, labels = next(iter(digits.train_batches(0)))
    method = _method("st", start_epoch=1)
    assert method.step(images, labels)["subnets"] == []
    method.on_epoch_end(0)
    assert len(method.step(images, labels)["subnets"]) == 1


def test_protect_leaves_main_bn_statistics_to_the_main_forward(digits):
    images, labels = next(iter(digits.train_batches(0)))
    protect = _method("st", num_subnets=3, bn="protect")
    reference = copy.deepcopy(protect.model)
    main_only = copy.deepcopy(protect.model).train()
    with torch.no_grad():
        main_only(images)  # what the main forward alone does to the statistics
    protect.step(images, labels)
    expected = nt.bn.save_stats(main_only)
    got = nt.bn.save_stats(protect.model)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    ref_method = nt.StimulativeTraining(
        reference, torch.optim.SGD(reference.parameters(), lr=0.1), num_subnets=3, bn="reference"
    )
    ref_method.step(images, labels)
    moved = nt.bn.save_stats(reference)
    assert not all(torch.equal(expected[k], moved[k]) for k in expected)
    assert ref_method.reestimates_main_bn and not protect.reestimates_main_bn


def test_st_label_target_and_validation():
    model = nt.create_model("resnet20", num_classes=10, in_chans=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for kwargs, message in [
        ({"lam": -1}, "st.lam=-1"),
        ({"kl_norm": "max"}, "st.kl_norm='max'"),
        ({"resize": (0.5, 1.5)}, r"st.resize=\[0.5, 1.5\]"),
        ({"target": "x"}, "st.target='x'"),
        ({"bn": "x"}, "st.bn='x'"),
    ]:
        with pytest.raises(ValueError, match=message):
            nt.StimulativeTraining(model, opt, **kwargs)
    vit = nt.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8)
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        nt.StimulativeTraining(vit, opt, resize=(0.5, 1.0))


def test_resize_per_is_checked():
    model = nt.create_model("resnet20", num_classes=10)
    with pytest.raises(ValueError, match="st.resize_per='batch' must be one of subnet, step"):
        StimulativeTraining(model, torch.optim.SGD(model.parameters(), lr=0.1), resize_per="batch")


def test_resize_multiple_draws_only_multiples_within_the_range():
    model = nt.create_model("resnet20", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    st = StimulativeTraining(
        model, optimizer, num_subnets=200, resize=[0.43, 1.0], resize_multiple=8
    )
    sides = {side for _, side in st._draw(224)}
    assert sides == set(range(96, 225, 8))  # int(0.43·224) = 96 .. 224: 17 sides
    every = StimulativeTraining(model, optimizer, num_subnets=400, resize=[0.43, 1.0])
    assert len({side for _, side in every._draw(224)}) > 100  # 1: every side, as before
    with pytest.raises(ValueError, match="st.resize_multiple=0 must be >= 1"):
        StimulativeTraining(model, optimizer, resize=[0.5, 1.0], resize_multiple=0)
