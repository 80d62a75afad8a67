"""Every helper that switches a model to eval mode gives each module its own mode back."""

from __future__ import annotations

import torch

import nestedtrain as nt
from nestedtrain.evaluation import evaluate
from nestedtrain.flops import count_flops
from nestedtrain.modes import eval_mode, kept_modes


def _mixed_model():
    model = nt.create_model("resnet20", num_classes=10)
    model.train()
    model.layer1[0].bn1.eval()  # a frozen BN inside a training model
    return model


def _modes(model):
    return [m.training for m in model.modules()]


def test_eval_mode_and_kept_modes_restore_each_module():
    model = _mixed_model()
    before = _modes(model)
    with eval_mode(model):
        assert not any(_modes(model))
    assert _modes(model) == before
    with kept_modes(model):
        model.train()
    assert _modes(model) == before


def test_library_helpers_keep_a_frozen_bn_frozen():
    model = _mixed_model()
    before = _modes(model)
    count_flops(model, 16, 3)
    assert _modes(model) == before
    batch = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))]
    evaluate(model, batch)
    assert _modes(model) == before
