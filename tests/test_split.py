"""A model run piece by piece (ModelSplit): stem, blocks and head reproduce the model."""

from __future__ import annotations

import pytest
import torch
from conftest import ListStageNet
from test_shared_prefix import MODELS, _batch

import nestedtrain as nt
from nestedtrain.elastic import ModelSplit


def test_model_split_reproduces_the_model_and_rejects_what_it_cannot_split():
    model, side, chans = MODELS["timm-resnet50"]()
    images, _ = _batch(side, chans)
    split = ModelSplit(model, nt.find_stages(model), images)
    model.eval()
    with torch.no_grad():
        reference = model(images)
    with torch.no_grad(), split.installed():
        x = split.stem(images)
        for s, stage in enumerate(split.stages):
            for b in range(len(stage)):
                x = split.block(("block", s, b))(x)
        torch.testing.assert_close(split.head(x), reference)
    nt.declare_stages(ListStageNet, ["stage"], skippable=[[0, 1, 2]])
    with pytest.raises(nt.elastic.SplitError, match="called once"):
        ModelSplit(ListStageNet(), nt.find_stages(ListStageNet()), torch.randn(2, 1, 8, 8))
