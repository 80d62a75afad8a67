from __future__ import annotations

import pytest
import torch
from torch import nn

import nestedtrain as nt
from nestedtrain.flops import (
    acc_flops_ratio,
    acc_per_flops,
    count_flops,
    count_params,
    motivation_flops,
)


def test_two_flops_per_multiply_add():
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 6, 10))
    assert count_flops(model, (4, 6), in_chans=2) == 2 * 48 * 10


@pytest.mark.parametrize("name, paper_mflops", [("resnet20", 82.82), ("resnet56", 254.76)])
def test_cifar_resnet_flops_match_the_paper(name, paper_mflops):
    # The Motivation paper's Table 8; its counter also counts norms and activations, which
    # FlopCounterMode leaves out (about 1.7M here), hence the tolerance.
    flops = count_flops(nt.create_model(name, num_classes=10), 32)
    assert flops / 1e6 == pytest.approx(paper_mflops, rel=0.03)


def test_count_flops_restores_every_module_mode():
    model = nt.create_model("resnet20", num_classes=10).train()
    model.layer2.eval()  # a part the user keeps frozen in eval mode
    count_flops(model, 16)
    assert model.training and model.layer1.training and model.fc.training
    assert not model.layer2.training and not model.layer2[0].bn1.training


def test_a_resnet56_subnet_costs_what_resnet32_costs():
    resnet56 = nt.create_model("resnet56", num_classes=10)
    resnet32 = nt.create_model("resnet32", num_classes=10)
    names = list(resnet56.state_dict())
    assert count_flops(resnet56, 32, subnet="5-5-5") == count_flops(resnet32, 32)
    assert count_params(resnet56, subnet="5-5-5") == count_params(resnet32)
    assert count_params(resnet56) > count_params(resnet32)
    assert list(resnet56.state_dict()) == names  # the whole model is back


def test_count_params_of_resnet20():
    # 16-32-64 channels, 3 blocks per stage, 10 classes: the well-known ~0.27M.
    assert count_params(nt.create_model("resnet20", num_classes=10)) == 269_722


def test_count_flops_rejects_empty_inputs():
    with pytest.raises(ValueError, match="input_size"):
        count_flops(nt.create_model("resnet20", num_classes=10), 0)


def test_motivation_flops_is_the_step_weighted_mean():
    assert motivation_flops(3, 1, 100.0, 200.0) == pytest.approx(125.0)
    assert motivation_flops(10, 0, 82.82, 140.13) == pytest.approx(82.82)
    assert motivation_flops(0, 5, 82.82, 140.13) == pytest.approx(140.13)
    with pytest.raises(ValueError, match="not both 0"):
        motivation_flops(0, 0, 1.0, 2.0)


def close_to_printed(value: float, printed: str) -> bool:
    """Within 1% of a table entry, or within its rounding (half a unit of its last digit)."""
    table = float(printed)
    decimals = len(printed.partition(".")[2])
    return abs(value - table) <= max(0.01 * abs(table), 0.5 * 10**-decimals + 1e-12)


# Motivation paper, CIFAR-10: Table 1 accuracies (%) and Table 8 forward MFLOPs.
# (Acc_X-Y-B, Acc_X-C, Acc_Y-C, F_X-Y, F_X-C, F_Y-C) -> Table 1's ACC/FLOPs (1e-2) and ratio.
TABLE_1 = {
    "res-20-32": ((92.83, 92.62, 93.63, 92.47, 82.82, 140.13), ("2.18", "1.76", "1.24")),
    "res-32-44": ((93.66, 93.63, 93.93, 149.67, 140.13, 197.44), ("0.31", "0.52", "0.60")),
    "res-44-56": ((94.10, 93.93, 94.12, 197.86, 197.44, 254.76), ("40.48", "0.33", "122.67")),
}


@pytest.mark.parametrize("row", sorted(TABLE_1))
def test_table_1_efficiency_metrics(row):
    inputs, (motivated, larger, ratio) = TABLE_1[row]
    metrics = acc_flops_ratio(*inputs)
    assert close_to_printed(metrics.motivated_training * 100, motivated)
    assert close_to_printed(metrics.larger_model * 100, larger)
    assert close_to_printed(metrics.ratio, ratio)
    acc_xyb, acc_xc, _, flops_xy, flops_xc, _ = inputs
    assert metrics.motivated_training == acc_per_flops(acc_xyb, acc_xc, flops_xy, flops_xc)


def test_efficiency_metrics_reject_undefined_ratios():
    with pytest.raises(ValueError, match="flops_ref"):
        acc_per_flops(93.0, 92.0, 82.82, 82.82)
    with pytest.raises(ValueError, match="undefined"):
        acc_flops_ratio(93.0, 92.0, 92.0, 90.0, 82.82, 140.13)


def test_count_flops_runs_on_the_models_dtype():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten()).to(torch.float64)
    # 4 output channels x 2x2 positions x 9 multiply-adds, two FLOPs each.
    assert count_flops(model, 4, in_chans=1) == 2 * 4 * 4 * 9
