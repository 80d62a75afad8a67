"""Samplers, KL / KL⁻ losses and BatchNorm tools."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import perturb_norms

import nestedtrain as nt

# ------------------------------------------------------------------------------- samplers


def test_ordered_sampler_space_sizes():
    assert len(nt.OrderedSampler(nt.create_model("resnet56", num_classes=10))) == 9**3
    resnet20 = nt.create_model("resnet20", num_classes=10)
    sampler = nt.OrderedSampler(resnet20)
    assert len(sampler) == 27 and len(sampler.all()) == 27
    assert len(set(sampler.all())) == 27
    assert sampler.all()[0] == nt.Subnet.full(resnet20)  # the full network is in the space
    assert all(s.is_ordered and min(s.depths) >= 1 for s in sampler.all())


def test_ordered_sampler_is_reproducible_and_uses_only_its_generator():
    sampler = nt.OrderedSampler(nt.create_model("resnet56", num_classes=10))
    draws = [sampler.sample(torch.Generator().manual_seed(3)) for _ in range(2)]
    assert draws[0] == draws[1]
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    seq_a = [str(sampler.sample(g)) for _ in range(50)]
    assert torch.equal(before, torch.random.get_rng_state())  # global RNG untouched
    g = torch.Generator().manual_seed(3)
    assert seq_a == [str(sampler.sample(g)) for _ in range(50)]
    assert len(set(seq_a)) > 20


def test_ordered_sampler_draws_uniform_drops_per_stage():
    sampler = nt.OrderedSampler(nt.create_model("resnet20", num_classes=10))
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3, 3)
    for _ in range(3000):
        for s, d in enumerate(sampler.sample(g).depths):
            counts[s, 3 - d] += 1
    assert torch.allclose(counts / 3000, torch.full((3, 3), 1 / 3), atol=0.04)


def test_ordered_sampler_max_drop_forms():
    resnet50 = nt.create_model("resnet50", num_classes=10)
    space3 = nt.OrderedSampler(resnet50, max_drop="space3")
    assert space3.max_drop == (0, 1, 3, 0) and len(space3) == 1 * 2 * 4 * 1
    depths = {s.depths for s in space3.all()}
    assert (3, 3, 3, 3) in depths and (3, 4, 6, 3) in depths
    assert nt.OrderedSampler(resnet50, max_drop=1).max_drop == (1, 1, 1, 1)
    assert nt.OrderedSampler(resnet50).max_drop == (2, 3, 5, 2)
    with pytest.raises(
        ValueError, match=r"stage 1 \(layer1\) can drop 0..2 trailing blocks, got 3"
    ):
        nt.OrderedSampler(resnet50, max_drop=(3, 0, 0, 0))
    with pytest.raises(ValueError, match="unknown sampling space 'space9'"):
        nt.OrderedSampler(resnet50, max_drop="space9")
    with pytest.raises(ValueError, match="has 3 entries but the model has 4 stages"):
        nt.OrderedSampler(resnet50, max_drop=(0, 0, 0))
    with pytest.raises(ValueError, match="max_drop=-1"):
        nt.OrderedSampler(resnet50, max_drop=-1)


def test_stochastic_sampler():
    model = nt.create_model("resnet20", num_classes=10)
    sampler = nt.StochasticSampler(model)
    everything = sampler.all()
    # stage 1: 3 skippable blocks, a non-empty subset (7); stages 2, 3: block 0 fixed, 2 free (4)
    assert len(sampler) == len(everything) == len(set(everything)) == 7 * 4 * 4
    g = torch.Generator().manual_seed(1)
    drawn = {sampler.sample(g) for _ in range(2000)}
    assert drawn == set(everything)
    for sub in drawn:
        sub.validate(nt.find_stages(model))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [sampler.sample(g1) for _ in range(10)] == [sampler.sample(g2) for _ in range(10)]
    with pytest.raises(ValueError, match="p=0"):
        nt.StochasticSampler(model, p=0)


# --------------------------------------------------------------------------------- kl_loss


def _kl_by_hand(student, teacher):
    p = torch.softmax(teacher, -1)
    return (p * (torch.log(p) - torch.log_softmax(student, -1))).sum(-1).mean()


def test_kl_loss_plain_matches_hand_computed():
    student = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.5, -1.0]])
    teacher = torch.tensor([[3.0, 2.0, 1.0], [1.0, 1.0, 1.0]])
    expected = _kl_by_hand(student, teacher)
    torch.testing.assert_close(nt.kl_loss(student, teacher), expected)
    # temperature divides both sides and multiplies the loss by T^2
    torch.testing.assert_close(
        nt.kl_loss(student, teacher, temperature=2.0), 4 * _kl_by_hand(student / 2, teacher / 2)
    )
    assert float(nt.kl_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-7)


def test_kl_loss_std_and_l2_norms_match_hand_computed():
    student = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    teacher = torch.tensor([[4.0, -2.0, 1.0, 1.0]])

    def std_norm(z):
        mean = z.mean(-1, keepdim=True)
        var = z.var(-1, unbiased=False, keepdim=True)
        return (z - mean) / torch.sqrt(var + 1e-7)

    expected_std = _kl_by_hand(3 * std_norm(student), 3 * std_norm(teacher))
    torch.testing.assert_close(
        nt.kl_loss(student, teacher, norm="std", amplitude=3.0), expected_std
    )
    l2 = lambda z: z / z.norm(dim=-1, keepdim=True)  # noqa: E731
    expected_l2 = 4 * _kl_by_hand(5 * l2(student) / 2, 5 * l2(teacher) / 2)
    got = nt.kl_loss(student, teacher, norm="l2", amplitude=5.0, temperature=2.0)
    torch.testing.assert_close(got, expected_l2)
    # KL⁻ ignores magnitude: scaling the student's logits changes nothing
    torch.testing.assert_close(
        nt.kl_loss(10 * student, teacher, norm="l2"), nt.kl_loss(student, teacher, norm="l2")
    )


def test_kl_loss_teacher_is_constant_and_errors():
    student = torch.randn(4, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    nt.kl_loss(student, teacher, norm="std").backward()
    assert student.grad is not None and teacher.grad is None
    with pytest.raises(ValueError, match="unknown logit norm 'max'"):
        nt.kl_loss(student, teacher, norm="max")
    with pytest.raises(ValueError, match="temperature=0"):
        nt.kl_loss(student, teacher, temperature=0)


def test_cross_entropy_soft_and_hard_targets():
    logits = torch.randn(3, 4)
    labels = torch.tensor([0, 3, 1])
    soft = F.one_hot(labels, 4).float()
    torch.testing.assert_close(
        nt.losses.cross_entropy(logits, soft), nt.losses.cross_entropy(logits, labels)
    )


# ---------------------------------------------------------------------------------- BN tools


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
