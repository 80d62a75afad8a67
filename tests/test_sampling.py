"""The sub-network samplers: space sizes, uniform and reproducible draws, their options."""

from __future__ import annotations

import pytest
import torch

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
