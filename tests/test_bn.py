"""BatchNorm tools: frozen statistics, re-calibration, saving and loading statistics."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import perturb_norms

import nestedtrain as nt


def test_frozen_stats_leaves_bn_untouched_but_normalises_by_batch():
    model = perturb_norms(nt.create_model("resnet20", num_classes=10)).train()
    before = nt.bn.save_stats(model)
    x = torch.randn(8, 3, 16, 16)
    with nt.bn.frozen_stats(model):
        frozen_out = model(x)
    after = nt.bn.save_stats(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the forward itself is the ordinary train-mode forward (batch statistics)
    torch.testing.assert_close(frozen_out, model(x))
    assert not all(torch.equal(before[k], v) for k, v in nt.bn.save_stats(model).items())
    assert all(bn.track_running_stats for bn in nt.bn.batchnorms(model))


def test_frozen_stats_eval_mode_uses_running_stats():
    model = perturb_norms(nt.create_model("resnet20", num_classes=10)).eval()
    x = torch.randn(2, 3, 16, 16)
    with nt.bn.frozen_stats(model):
        out = model(x)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)


def test_recalibrate_gives_exact_mean_of_what_the_first_bn_saw():
    model = perturb_norms(nt.create_model("resnet20", num_classes=10, in_chans=1))
    g = torch.Generator().manual_seed(0)
    # unequal batch sizes: the estimate must weight by images, not by batches
    batches = [torch.randn(n, 1, 8, 8, generator=g) * 2 + 1 for n in (5, 16, 3)]
    labelled = [(b, torch.zeros(len(b), dtype=torch.long)) for b in batches]
    nt.bn.recalibrate(model, labelled)
    assert not model.training
    with torch.no_grad():
        seen = torch.cat([model.conv1(b) for b in batches])  # what bn1 saw
    expected_mean = seen.mean((0, 2, 3))
    torch.testing.assert_close(model.bn1.running_mean, expected_mean, rtol=1e-5, atol=1e-6)
    per_batch_var = [model.conv1(b).detach().var((0, 2, 3), unbiased=True) for b in batches]
    weights = torch.tensor([5.0, 16.0, 3.0]) / 24
    expected_var = sum(w * v for w, v in zip(weights, per_batch_var))
    torch.testing.assert_close(model.bn1.running_var, expected_var, rtol=1e-5, atol=1e-6)
    assert model.bn1.momentum == 0.1  # restored


def test_recalibrate_subnet_only_touches_bns_it_runs():
    model = perturb_norms(nt.create_model("resnet20", num_classes=10))
    before = nt.bn.save_stats(model)
    nt.bn.recalibrate(model, [torch.randn(4, 3, 16, 16)], subnet="1-2-3")
    after = nt.bn.save_stats(model)
    changed = {k.rsplit(".", 1)[0] for k in before if not torch.equal(before[k], after[k])}
    assert "layer1.0.bn1" in changed and "layer3.2.bn2" in changed
    assert not any(k.startswith(("layer1.1", "layer1.2", "layer2.2")) for k in changed)
    with pytest.raises(ValueError, match="no batches"):
        nt.bn.recalibrate(model, [])


def test_save_and_load_stats_round_trip():
    model = perturb_norms(nt.create_model("resnet20", num_classes=10))
    saved = nt.bn.save_stats(model)
    model.train()(torch.randn(4, 3, 8, 8))
    nt.bn.load_stats(model, saved)
    assert all(torch.equal(v, nt.bn.save_stats(model)[k]) for k, v in saved.items())
    assert math.isclose(len(saved), 3 * 19)  # 19 BNs in resnet20, 3 buffers each


def test_recalibrate_keeps_dropout_off():
    torch.manual_seed(0)
    with_dropout = perturb_norms(nt.create_model("resnet20", num_classes=10, drop_rate=0.9))
    without = nt.create_model("resnet20", num_classes=10)
    without.load_state_dict(with_dropout.state_dict())
    batches = [torch.randn(6, 3, 8, 8) for _ in range(2)]
    nt.bn.recalibrate(with_dropout, batches)
    nt.bn.recalibrate(without, batches)
    a, b = nt.bn.save_stats(with_dropout), nt.bn.save_stats(without)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not with_dropout.training and not with_dropout.bn1.training
