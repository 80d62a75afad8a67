from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import UserResNet, declare_user_resnet
from timm.optim import Lamb, RMSpropTF
from torch import nn

import nestedtrain as nt
from nestedtrain.elastic.matching import block_depths
from nestedtrain.elastic.stages import model_family
from nestedtrain.elastic.subnet import use_subnet
from nestedtrain.elastic.weightmap import WeightMap, inherit

VIT = {"img_size": 32}
PAIRS = {
    "cifar-resnet20-32": ("resnet20", "resnet32", {}),
    "efficientnet_b0-b1": ("efficientnet_b0", "efficientnet_b1", {}),
    "efficientnet_b1-b2": ("efficientnet_b1", "efficientnet_b2", {}),
    "vit_tiny-small": ("vit_tiny_patch16_224", "vit_small_patch16_224", VIT),
    "densenet121-169": ("densenet121", "densenet169", {}),
}


def randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    # timm zero-initialises the last norm of residual branches; random norms make every block
    # matter, so an output comparison can fail.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                if getattr(m, "running_var", None) is not None:
                    m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()


@functools.cache
def cached_pair(pair: str) -> tuple[nn.Module, nn.Module, WeightMap]:
    """One instance per pair for the whole module: building the larger timm models is the
    slow part of these tests."""
    base_name, motivated_name, kwargs = PAIRS[pair]
    torch.manual_seed(0)
    base = randomize_norms(nt.create_model(base_name, num_classes=10, **kwargs), 1)
    motivated = randomize_norms(nt.create_model(motivated_name, num_classes=10, **kwargs), 2)
    return base, motivated, WeightMap(base, motivated)


def numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_every_base_tensor_is_matched_once(pair):
    base, motivated, weight_map = cached_pair(pair)
    assert weight_map.unmatched == []
    base_sd, motivated_sd = base.state_dict(), motivated.state_dict()
    assert set(weight_map.tensors) == set(base_sd)
    for name, tmap in weight_map.tensors.items():
        # The pieces tile the base tensor exactly ...
        assert sum(numel(base_sd[name][b].shape) for b, _ in tmap.pieces) == base_sd[name].numel()
    # ... and land on distinct motivated entries: covered entries == base entries.
    masks = weight_map.differential()
    covered = sum(int((~m).sum()) for m in masks.values())
    assert covered == sum(t.numel() for t in base_sd.values())
    assert set(masks) == set(motivated_sd)
    assert sum(int(m.sum()) for m in masks.values()) > 0  # the motivated model is larger


def test_resnet_depth_rule_maps_last_block_to_last_block():
    _, _, weight_map = cached_pair("cifar-resnet20-32")
    rename = {n: t.motivated_name for n, t in weight_map.tensors.items()}
    assert rename["layer1.0.conv1.weight"] == "layer1.0.conv1.weight"
    assert rename["layer2.1.bn2.running_var"] == "layer2.1.bn2.running_var"
    assert rename["layer3.2.conv2.weight"] == "layer3.4.conv2.weight"
    assert rename["fc.weight"] == "fc.weight"
    masks = weight_map.differential()
    assert masks["layer2.2.conv1.weight"].all() and masks["layer2.3.bn1.weight"].all()
    assert not masks["layer2.4.conv1.weight"].any()


def zero_differential_weights(weight_map: WeightMap, motivated: nn.Module) -> None:
    # With every differential conv/linear entry zero, the extra channels and layers can no
    # longer reach the base's channels, so the motivated model computes the base model.
    masks = weight_map.differential()
    with torch.no_grad():
        for name, tensor in motivated.state_dict(keep_vars=True).items():
            if tensor.dim() >= 2:
                tensor[masks[name]] = 0


@pytest.mark.parametrize(
    "pair, subnet, zero_differential",
    [
        ("cifar-resnet20-32", "0.1.4-0.1.4-0.1.4", False),  # depth: first l-1 and last
        ("efficientnet_b0-b1", "1-2-2-3-3-4-1", False),  # depth: first l per stage
        ("efficientnet_b1-b2", None, True),  # width: leading channels
        ("densenet121-169", None, True),  # concatenated inputs, wider block 4 input
    ],
)
def test_mapped_base_runs_exactly_inside_the_motivated_model(pair, subnet, zero_differential):
    base, motivated, weight_map = cached_pair(pair)
    weight_map.copy_to_motivated(base, motivated)
    if zero_differential:
        zero_differential_weights(weight_map, motivated)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = base(x)
        if subnet is None:
            got = motivated(x)
        else:
            with use_subnet(motivated, subnet):
                got = motivated(x)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_declared_models_map_leading_blocks_and_channels():
    # A model known only through declare_stages: the family comes from elastic.stages, the
    # stages from the declaration, and blocks and channels match by their leading entries.
    declare_user_resnet()
    torch.manual_seed(0)
    base = randomize_norms(UserResNet((2, 2), width=4), 1)
    motivated = randomize_norms(UserResNet((3, 4), width=8), 2)
    assert model_family(base) == "declared" and block_depths(motivated) == (3, 4)
    weight_map = WeightMap(base, motivated)
    assert weight_map.family == "declared" and weight_map.unmatched == []
    rename = {n: t.motivated_name for n, t in weight_map.tensors.items()}
    assert rename["first.1.conv.weight"] == "first.1.conv.weight"  # not the last block
    assert rename["second.1.bn.running_var"] == "second.1.bn.running_var"
    weight_map.copy_to_motivated(base, motivated)
    zero_differential_weights(weight_map, motivated)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = base(x)
        with use_subnet(motivated, "2-2"):
            got = motivated(x)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    small = UserResNet((1, 2), width=4)
    inherit(motivated, small)
    assert torch.equal(small.second[1].conv.weight, motivated.second[1].conv.weight[:8, :8])


def test_families_weightmap_does_not_map_are_refused_by_name():
    assert model_family(nt.create_model("resnet20", num_classes=10)) == "cifar-resnet"
    assert model_family(nn.Sequential(nn.Linear(2, 2))) is None
    small = nt.create_model("mobilenetv3_small_050", num_classes=10)
    large = nt.create_model("mobilenetv3_small_100", num_classes=10)
    with pytest.raises(ValueError, match=r"MobileNetV3 \(family timm-mobilenetv3\).*declare"):
        WeightMap(small, large)
    with pytest.raises(ValueError, match="Sequential, which WeightMap does not map"):
        WeightMap(nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 4)))


def test_vit_qkv_split_keeps_q_k_v_apart_and_literal_does_not():
    base, motivated, split = cached_pair("vit_tiny-small")
    literal = WeightMap(base, motivated, qkv="literal")
    d, d_mot = 192, 384
    assert [(b[0], m[0]) for b, m in split.tensors["blocks.0.attn.qkv.weight"].pieces] == [
        (slice(j * d, (j + 1) * d), slice(j * d_mot, j * d_mot + d)) for j in range(3)
    ]
    assert literal.tensors["blocks.0.attn.qkv.weight"].pieces == (
        ((slice(0, 3 * d), slice(0, d)), (slice(0, 3 * d), slice(0, d))),
    )
    # Every other tensor is mapped the same way by both.
    for name, tmap in split.tensors.items():
        if "attn.qkv" not in name:
            assert literal.tensors[name] == tmap

    qkv_base = base.blocks[3].attn.qkv
    split.copy_to_motivated(base, motivated)
    qkv_mot = motivated.blocks[3].attn.qkv
    for j in range(3):
        assert torch.equal(
            qkv_mot.weight[j * d_mot : j * d_mot + d, :d], qkv_base.weight[j * d : (j + 1) * d]
        )
        assert torch.equal(
            qkv_mot.bias[j * d_mot : j * d_mot + d], qkv_base.bias[j * d : (j + 1) * d]
        )
    assert torch.equal(motivated.pos_embed[..., :d], base.pos_embed)
    assert torch.equal(
        motivated.blocks[3].attn.proj.weight[:d, :d], base.blocks[3].attn.proj.weight
    )

    literal.copy_to_motivated(base, motivated)
    assert torch.equal(motivated.blocks[3].attn.qkv.weight[: 3 * d, :d], qkv_base.weight)
    with pytest.raises(ValueError, match="qkv must be one of"):
        WeightMap(base, motivated, qkv="fused")


# Tiny ViTs of one family that differ in width (and heads), for the optimizer-state tests.
TINY_VIT = {"img_size": 8, "patch_size": 4, "depth": 2, "mlp_ratio": 2.0}


def small_pair(kind: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    if kind == "resnet":
        return nt.create_model("resnet20", num_classes=10), nt.create_model(
            "resnet32", num_classes=10
        )
    base = nt.create_model(
        "vit_tiny_patch16_224", num_classes=10, embed_dim=32, num_heads=2, **TINY_VIT
    )
    motivated = nt.create_model(
        "vit_tiny_patch16_224", num_classes=10, embed_dim=64, num_heads=4, **TINY_VIT
    )
    return base, motivated


def make_optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05, amsgrad=True)
    return Lamb(params, lr=1e-2)  # keeps its step in the param group


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def optimizer_snapshot(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    named = {n: p for n, p in model.named_parameters()}
    state = {n: copy.deepcopy(optimizer.state[p]) for n, p in named.items() if p in optimizer.state}
    steps = [copy.deepcopy(g.get("step")) for g in optimizer.param_groups]
    return {"state": state, "group_steps": steps}


def assert_same(a, b) -> None:
    if isinstance(a, dict):
        assert set(a) == set(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif torch.is_tensor(a):
        assert torch.equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("family", ["resnet", "vit"])
@pytest.mark.parametrize("kind", ["sgd", "adamw", "lamb"])
def test_switch_and_switch_back_is_the_identity_on_the_base(kind, family):
    base, motivated = small_pair(family)
    base_opt = make_optimizer(kind, base.parameters())
    motivated_opt = make_optimizer(kind, motivated.parameters())
    weight_map = WeightMap(base, motivated)
    train_step(base, base_opt, 0)
    train_step(base, base_opt, 1)
    train_step(motivated, motivated_opt, 2)  # the motivated model has state of its own

    masks = weight_map.differential()
    base_before = copy.deepcopy(base.state_dict())
    base_state_before = optimizer_snapshot(base_opt, base)
    motivated_before = copy.deepcopy(motivated.state_dict())
    motivated_state_before = optimizer_snapshot(motivated_opt, motivated)

    weight_map.copy_to_motivated(base, motivated)
    weight_map.copy_optimizer_state(base_opt, motivated_opt, "to_motivated")

    # Differential weights, buffers and their optimizer state did not move; mapped ones did.
    motivated_after = motivated.state_dict()
    motivated_state_after = optimizer_snapshot(motivated_opt, motivated)["state"]
    for name, before in motivated_before.items():
        assert torch.equal(motivated_after[name][masks[name]], before[masks[name]])
    for name, state in motivated_state_before["state"].items():
        for key, before in state.items():
            if torch.is_tensor(before) and before.shape == masks[name].shape:
                after = motivated_state_after[name][key]
                assert torch.equal(after[masks[name]], before[masks[name]])
    momentum_key = {"sgd": "momentum_buffer", "adamw": "exp_avg", "lamb": "exp_avg"}[kind]
    for tmap in weight_map.tensors.values():
        for base_index, motivated_index in tmap.pieces:
            got = motivated_after[tmap.motivated_name][motivated_index]
            assert torch.equal(got, base_before[tmap.base_name][base_index])
            if tmap.base_name in base_state_before["state"]:
                got = motivated_state_after[tmap.motivated_name][momentum_key][motivated_index]
                want = base_state_before["state"][tmap.base_name][momentum_key][base_index]
                assert torch.equal(got, want)

    # Spoil the base, then read everything back from the motivated model.
    with torch.no_grad():
        for tensor in base.state_dict(keep_vars=True).values():
            tensor.fill_(7)
    base_opt.state.clear()
    for group in base_opt.param_groups:
        group.pop("step", None)
    weight_map.copy_to_base(motivated, base)
    weight_map.copy_optimizer_state(motivated_opt, base_opt, "to_base")

    assert_same(base.state_dict(), base_before)
    assert_same(optimizer_snapshot(base_opt, base), base_state_before)


def test_a_motivated_step_trains_the_base_inside():
    torch.manual_seed(0)
    base = nt.create_model("resnet20", num_classes=10)
    motivated = nt.create_model("resnet44", num_classes=10)
    base_opt = make_optimizer("sgd", base.parameters())
    motivated_opt = make_optimizer("sgd", motivated.parameters())
    weight_map = WeightMap(base, motivated)
    train_step(base, base_opt, 0)
    weight_map.copy_to_motivated(base, motivated)
    weight_map.copy_optimizer_state(base_opt, motivated_opt)
    train_step(motivated, motivated_opt, 1)
    before = copy.deepcopy(base.state_dict())
    weight_map.copy_to_base(motivated, base)
    weight_map.copy_optimizer_state(motivated_opt, base_opt, "to_base")
    after = base.state_dict()
    assert not torch.equal(after["layer2.0.conv1.weight"], before["layer2.0.conv1.weight"])
    assert torch.equal(
        after["layer2.2.conv1.weight"], motivated.state_dict()["layer2.6.conv1.weight"]
    )
    assert torch.equal(
        base_opt.state[base.layer2[2].conv1.weight]["momentum_buffer"],
        motivated_opt.state[motivated.layer2[6].conv1.weight]["momentum_buffer"],
    )


def test_missing_destination_state_is_created_around_the_slice():
    base, motivated = small_pair("vit")
    base_opt = RMSpropTF(base.parameters(), lr=1e-3, momentum=0.9)
    motivated_opt = RMSpropTF(motivated.parameters(), lr=1e-3, momentum=0.9)
    weight_map = WeightMap(base, motivated)
    train_step(base, base_opt, 0)
    weight_map.copy_optimizer_state(base_opt, motivated_opt, "to_motivated")
    base_w, motivated_w = base.blocks[1].mlp.fc1.weight, motivated.blocks[1].mlp.fc1.weight
    state, base_state = motivated_opt.state[motivated_w], base_opt.state[base_w]
    rows, cols = base_w.shape
    assert torch.equal(state["momentum_buffer"][:rows, :cols], base_state["momentum_buffer"])
    assert torch.equal(state["square_avg"][:rows, :cols], base_state["square_avg"])
    assert torch.equal(state["step"], base_state["step"])
    differential = weight_map.differential()["blocks.1.mlp.fc1.weight"]
    assert differential.sum() == motivated_w.numel() - base_w.numel()
    assert (state["momentum_buffer"][differential] == 0).all()
    # RMSpropTF starts its squared average at one; zero would blow up the first step.
    assert (state["square_avg"][differential] == 1).all()
    with pytest.raises(ValueError, match="same class"):
        weight_map.copy_optimizer_state(base_opt, torch.optim.SGD(motivated.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="direction"):
        weight_map.copy_optimizer_state(base_opt, motivated_opt, "sideways")


def test_inherit_fills_a_small_densenet_from_a_large_one():
    small, large, _ = cached_pair("densenet121-169")
    small = copy.deepcopy(small)
    inherit(large, small)
    # Block 4: the small model's block input (512 channels) comes first in both; its first
    # layer's output follows the 640-channel block input of the large model.
    conv = "features.denseblock4.denselayer2.conv1.weight"
    small_w, large_w = small.state_dict()[conv], large.state_dict()[conv]
    assert torch.equal(small_w[:, :512], large_w[:128, :512])
    assert torch.equal(small_w[:, 512:544], large_w[:128, 640:672])
    assert torch.equal(small.classifier.bias, large.classifier.bias)


def test_inherit_refuses_tensors_it_cannot_fill():
    torch.manual_seed(0)
    small = nt.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32)
    large = nt.create_model("vit_small_patch16_224", num_classes=10, img_size=64)
    assert WeightMap(small, large).unmatched == ["pos_embed"]  # 5 tokens vs 17
    with pytest.raises(ValueError, match="pos_embed"):
        inherit(large, small)


@pytest.mark.parametrize(
    "base_name, motivated_name, match",
    [
        ("resnet20", "vit_tiny_patch16_224", "one family"),
        ("resnet32", "resnet20", "deeper"),
        ("resnet20", "resnet20", "same architecture"),
        ("resnet18", "resnet26", "different blocks"),
        ("efficientnet_b2", "efficientnet_b1", "larger"),
    ],
)
def test_pairs_that_cannot_be_mapped_raise(base_name, motivated_name, match):
    kwargs = {"num_classes": 10}
    base = nt.create_model(base_name, **kwargs)
    motivated = nt.create_model(motivated_name, **kwargs)
    with pytest.raises(ValueError, match=match):
        WeightMap(base, motivated)


def test_maps_and_copies_refuse_a_model_inside_use_subnet():
    base = nt.create_model("resnet20", num_classes=10)
    motivated = nt.create_model("resnet32", num_classes=10)
    with pytest.raises(ValueError, match="num_classes"):
        WeightMap(base, nt.create_model("resnet32", num_classes=100))
    weight_map = WeightMap(base, motivated)
    with use_subnet(motivated, "3-3-3"), pytest.raises(ValueError, match="use_subnet"):
        weight_map.copy_to_motivated(base, motivated)
    with pytest.raises(ValueError, match="does not fit"):
        weight_map.copy_to_motivated(base, nt.create_model("resnet44", num_classes=10))
