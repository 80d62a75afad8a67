"""Stages, Subnets, use_subnet and export_subnet on every built-in family."""

from __future__ import annotations

import copy
import io

import pytest
import timm
import torch
import torchvision
from conftest import make_model, perturb_norms
from torch import nn

import nestedtrain as nt


def _shallow_ordered(stages) -> tuple[int, ...]:
    """Depths that drop as many trailing blocks as allowed (at most 2) in every stage."""
    return tuple(len(st) - min(2, st.num_trailing_skippable) for st in stages)


def _hand_built(model: nn.Module, stages, depths) -> nn.Module:
    """A deep copy of the model with each stage container rebuilt from its first d blocks."""
    copied = copy.deepcopy(model)
    for stage, d in zip(stages, depths):
        parent_path, _, attr = stage.name.rpartition(".")
        parent = copied.get_submodule(parent_path) if parent_path else copied
        blocks = list(copied.get_submodule(stage.name).children())[:d]
        setattr(parent, attr, nn.Sequential(*blocks))
    return copied


def test_full_subnet_equals_plain_model(family_model):
    _, model, side = family_model
    model.eval()
    x = torch.randn(2, 3, side, side)
    expected = model(x)
    with nt.use_subnet(model, nt.Subnet.full(model)):
        got = model(x)
    assert torch.equal(got, expected)


def test_ordered_subnet_equals_hand_built_and_export(family_model):
    family, model, side = family_model
    model.eval()
    stages = nt.find_stages(model)
    depths = _shallow_ordered(stages)
    assert depths != tuple(len(s) for s in stages), f"{family}: test needs a real sub-network"
    sub = nt.Subnet.ordered(model, depths)
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        with nt.use_subnet(model, sub):
            got = model(x)
        hand = _hand_built(model, stages, depths).eval()(x)
        exported = nt.export_subnet(model, sub).eval()(x)
        full = model(x)
    torch.testing.assert_close(got, hand, rtol=0, atol=0)
    torch.testing.assert_close(exported, hand, rtol=0, atol=0)
    assert not torch.allclose(got, full), f"{family}: sub-network output equals the full one"


def test_state_dict_keys_unchanged_and_load_into_fresh_timm(family_model):
    family, model, side = family_model
    keys = list(model.state_dict())
    sub = nt.Subnet.ordered(model, _shallow_ordered(nt.find_stages(model)))
    with nt.use_subnet(model, sub):
        model(torch.randn(2, 3, side, side))
    assert list(model.state_dict()) == keys
    name, kwargs, _ = __import__("conftest").FAMILIES[family]
    fresh = timm.create_model(name, **kwargs)
    fresh.load_state_dict(model.state_dict())  # strict


def test_skipped_blocks_get_no_gradient(family_model):
    _, model, side = family_model
    model.train()
    stages = nt.find_stages(model)
    depths = _shallow_ordered(stages)
    with nt.use_subnet(model, nt.Subnet.ordered(model, depths)):
        model(torch.randn(2, 3, side, side)).sum().backward()
    for stage, d in zip(stages, depths):
        for i, block in enumerate(stage.blocks):
            grads = [p.grad for p in block.parameters()]
            if i < d:
                assert any(g is not None and g.abs().sum() > 0 for g in grads)
            else:
                assert all(g is None for g in grads), f"{stage.name}[{i}] got a gradient"


def test_vit_blocks_with_attn_mask_run_under_subnet():
    model, side = make_model("timm-vit_tiny")
    model.eval()
    x = torch.randn(2, 3, side, side)
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    mask = torch.zeros(tokens, tokens)
    sub = nt.Subnet.ordered(model, (4,))
    with torch.no_grad(), nt.use_subnet(model, sub):
        masked = model.forward_features(x, attn_mask=mask)
        plain = model.forward_features(x)
    torch.testing.assert_close(masked, plain)
    assert len(model.blocks) == 12


def test_torchvision_resnet_stages():
    model = perturb_norms(torchvision.models.resnet18(num_classes=5)).eval()
    stages = nt.find_stages(model)
    assert [s.name for s in stages] == ["layer1", "layer2", "layer3", "layer4"]
    assert [s.skippable for s in stages] == [(True, True)] + [(False, True)] * 3
    x = torch.randn(1, 3, 32, 32)
    sub = nt.Subnet.ordered(model, (1, 1, 1, 1))
    with torch.no_grad(), nt.use_subnet(model, sub):
        got = model(x)
    torch.testing.assert_close(got, nt.export_subnet(model, sub).eval()(x), rtol=0, atol=0)


def test_cifar_resnet_first_block_of_each_stage():
    model = nt.create_model("resnet20", num_classes=10, in_chans=1)
    skippable = [s.skippable for s in nt.find_stages(model)]
    assert skippable == [(True, True, True), (False, True, True), (False, True, True)]
    assert 0.26e6 < sum(p.numel() for p in model.parameters()) < 0.28e6
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_resnet56_555_is_resnet32():
    big = nt.create_model("resnet56", num_classes=10)
    small = nt.export_subnet(big, "5-5-5")
    buffer = io.BytesIO()
    torch.save(small.state_dict(), buffer)
    buffer.seek(0)
    resnet32 = nt.create_model("resnet32", num_classes=10)
    resnet32.load_state_dict(torch.load(buffer, weights_only=True))  # strict
    assert list(resnet32.state_dict()) == list(small.state_dict())


def test_timm_registry_has_our_models():
    model = timm.create_model("resnet20", num_classes=3, in_chans=1)
    assert isinstance(model, nt.models.CifarResNet)
    with pytest.raises(ValueError, match="unknown model 'resnet7'"):
        nt.create_model("resnet7")


def test_use_subnet_restores_after_error_and_reenters():
    model = nt.create_model("resnet20", num_classes=10).eval()
    x = torch.randn(2, 3, 16, 16)
    full = model(x)
    with pytest.raises(RuntimeError, match="boom"):
        with nt.use_subnet(model, "1-1-1"):
            raise RuntimeError("boom")
    torch.testing.assert_close(model(x), full, rtol=0, atol=0)
    outs = []
    for _ in range(2):
        with nt.use_subnet(model, "1-2-1"):
            outs.append(model(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert [len(s) for s in nt.find_stages(model)] == [3, 3, 3]
    assert len(model.layer1) == 3


def test_nested_use_subnet_applies_inner_then_restores_outer():
    model = nt.create_model("resnet20", num_classes=10).eval()
    x = torch.randn(2, 3, 16, 16)
    with nt.use_subnet(model, "1-1-1"):
        outer = model(x)
        with nt.use_subnet(model, "3-3-3"):
            assert len(model.layer1) == 3
            torch.testing.assert_close(model(x), nt.export_subnet(model, "3-3-3")(x))
        torch.testing.assert_close(model(x), outer, rtol=0, atol=0)
    assert len(model.layer1) == 3


def test_two_models_run_different_subnets():
    a = nt.create_model("resnet20", num_classes=10).eval()
    b = copy.deepcopy(a)
    x = torch.randn(2, 3, 16, 16)
    with nt.use_subnet(a, "1-1-1"), nt.use_subnet(b, "2-3-1"):
        assert (len(a.layer2), len(b.layer2)) == (1, 3)
        ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, nt.export_subnet(a, "1-1-1")(x))
    torch.testing.assert_close(yb, nt.export_subnet(b, "2-3-1")(x))


def test_use_subnet_under_no_grad_and_train_mode():
    model = perturb_norms(nt.create_model("resnet20", num_classes=10)).train()
    exported = nt.export_subnet(model, "2-2-2")  # in train mode too: BN normalises by the batch
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad(), nt.use_subnet(model, "2-2-2"):
        out = model(x)
        expected = exported(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # the kept blocks' BN statistics follow the batch; the skipped block's are left alone
    after = model.state_dict()
    assert not torch.equal(after["layer1.1.bn1.running_mean"], before["layer1.1.bn1.running_mean"])
    assert torch.equal(after["layer1.2.bn1.running_mean"], before["layer1.2.bn1.running_mean"])


def test_reordered_and_gapped_subnets_run_like_their_export():
    model = perturb_norms(nt.create_model("resnet56", num_classes=10)).eval()
    x = torch.randn(2, 3, 16, 16)
    for text in ("0.2.1-4-0.3", "8.-0.2.5-1", "3.1-0.8.7-0.4."):
        sub = nt.Subnet.parse(model, text)
        with torch.no_grad(), nt.use_subnet(model, sub):
            got = model(x)
        torch.testing.assert_close(got, nt.export_subnet(model, sub).eval()(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------- Subnet form
@pytest.mark.parametrize(
    "text, blocks",
    [
        ("5-9-3", ((0, 1, 2, 3, 4), tuple(range(9)), (0, 1, 2))),
        ("0.1.2-0.2-3", ((0, 1, 2), (0, 2), (0, 1, 2))),
        ("0.2.1-4-3.", ((0, 2, 1), (0, 1, 2, 3), (3,))),
        ("1-0.-2.", ((0,), (0,), (2,))),
    ],
)
def test_subnet_string_round_trip(text, blocks):
    sub = nt.Subnet.from_string(text)
    assert sub.blocks == blocks
    assert nt.Subnet.from_string(str(sub)) == sub
    assert str(nt.Subnet(blocks)) == str(sub)


def test_subnet_is_immutable_hashable_and_ordered_depths():
    model = nt.create_model("resnet56", num_classes=10)
    sub = nt.Subnet.ordered(model, (5, 9, 3))
    assert str(sub) == "5-9-3" and sub.depths == (5, 9, 3) and sub.is_ordered
    assert hash(sub) == hash(nt.Subnet.parse(model, "5-9-3"))
    assert len({sub, nt.Subnet.parse(model, "5-9-3")}) == 1
    with pytest.raises(AttributeError):
        sub.x = 1
    gapped = nt.Subnet.parse(model, "0.2-9-3")
    with pytest.raises(ValueError, match="not ordered"):
        _ = gapped.depths
    assert nt.Subnet.full(model).is_full(model)


@pytest.mark.parametrize(
    "text, message",
    [
        ("3-3", "has 2 stages but the model has 3"),
        ("3-3-3-3", "has 4 stages but the model has 3"),
        ("0.9-3-3", r"stage 1 \(layer1\): block 9 is out of range, the stage has blocks 0..8"),
        ("3-1.2-3", r"stage 2 \(layer2\): block 0 is not skippable .* cannot be dropped"),
        ("3-3-2.0", r"stage 3 \(layer3\): block 2 cannot move across a non-skippable block"),
        ("3-0.1.1-3", r"stage 2 \(layer2\): block 1 is listed twice"),
        ("3-x-3", "stage 2 is 'x'"),
        ("3-0-3", r"stage 2 \(layer2\): every stage keeps at least one block"),
        ("10-3-3", r"stage 1 \(layer1\): block 9 is out of range"),
    ],
)
def test_subnet_validation_errors(text, message):
    model = nt.create_model("resnet56", num_classes=10)
    with pytest.raises(ValueError, match=message):
        nt.Subnet.parse(model, text)


def test_ordered_rejects_dropping_non_skippable():
    model = nt.create_model("resnet20", num_classes=10)
    with pytest.raises(ValueError, match="at least one block"):
        nt.Subnet.ordered(model, (0, 1, 1))


# ------------------------------------------------------------------------ declared stages
class TwoStageNet(nn.Module):
    """A user's residual model nestedtrain does not know."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.first = nn.ModuleList([_Res(8) for _ in range(3)])
        self.second = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), _Res(16), _Res(16))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.stem(x)
        for block in self.first:
            x = block(x)
        return self.head(self.second(x).mean((2, 3)))


class _Res(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + torch.relu(self.conv(x))


def test_unknown_model_error_names_class_and_how_to_declare():
    with pytest.raises(ValueError, match=r"TwoStageNet.*timm ResNets.*declare_stages"):
        nt.find_stages(TwoStageNet())


def test_declared_stages_work_everywhere():
    class Declared(TwoStageNet):
        pass

    nt.declare_stages(Declared, ["first", "second"], skippable=[[0, 1, 2], [1, 2]])
    model = Declared().eval()
    stages = nt.find_stages(model)
    assert [s.skippable for s in stages] == [(True, True, True), (False, True, True)]
    assert len(nt.OrderedSampler(model)) == 3 * 3
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), nt.use_subnet(model, "0.2-1"):
        got = model(x)
    torch.testing.assert_close(got, nt.export_subnet(model, "0.2-1")(x), rtol=0, atol=0)
    # A rule instead of lists, and an explicit spec without declaring.
    spec = nt.StageSpec(("first", "second"), lambda b: isinstance(b, _Res))
    assert [s.skippable for s in nt.find_stages(TwoStageNet(), spec)][1] == (False, True, True)


def test_stage_spec_errors():
    with pytest.raises(ValueError, match="2 stages but paths has 1"):
        nt.StageSpec(("first",), [[0], [1]])
    with pytest.raises(ValueError, match="'nope' is not a submodule"):
        nt.find_stages(TwoStageNet(), nt.StageSpec(("nope",), [[0]]))
    with pytest.raises(ValueError, match="is a Conv2d"):
        nt.find_stages(TwoStageNet(), nt.StageSpec(("stem",), [[0]]))
    with pytest.raises(ValueError, match="skippable index 5 is out of range"):
        nt.find_stages(TwoStageNet(), nt.StageSpec(("first",), [[5]]))
