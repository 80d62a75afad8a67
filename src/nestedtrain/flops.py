"""FLOPs and parameter counts, and the Motivation paper's efficiency metrics.

FLOPs are forward FLOPs for one image as ``torch.utils.flop_counter.FlopCounterMode`` counts
them: two per multiply-add of convolutions, matrix products and attention (the convention of
the Motivation paper's CIFAR ResNet table: resnet20 on 32x32 is 81.1M here, 82.82M there).
Element-wise work (norms, activations, additions) is not counted. The same paper's ImageNet
ResNet, ViT and EfficientNet tables (3.8G, 1.3G, 0.39G) count one per multiply-add: halve
these counts to compare with them.

The motivation metrics compare a base model X trained with motivation from Y (``X-Y-B``) to
X and Y trained classically (``X-C``, ``Y-C``):

- ``F_X-Y = (n_base * F_base + n_mot * F_mot) / (n_base + n_mot)``: the mean forward FLOPs
  of a training step, over ``n_base`` base and ``n_mot`` motivated steps;
- ``ACC/FLOPs_X-Y-B = (Acc_X-Y-B - Acc_X-C) / (F_X-Y - F_X-C)``: accuracy gained per FLOP
  added by motivation;
- ``ACC/FLOPs_Y-C = (Acc_Y-C - Acc_X-C) / (F_Y-C - F_X-C)``: the same for moving to Y;
- ``ACC/F_Ratio = ACC/FLOPs_X-Y-B / ACC/FLOPs_Y-C``.

Units are the caller's: the paper's Table 1 uses percent and MFLOPs (so its ACC/FLOPs
column is in 1e-2 % per MFLOP).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .elastic.stages import unwrap
from .errors import ConfigError
from .modes import eval_mode

__all__ = [
    "count_flops",
    "count_params",
    "motivation_flops",
    "acc_per_flops",
    "acc_flops_ratio",
    "AccFlops",
]

if TYPE_CHECKING:
    from .elastic.subnet import Subnet

# A Subnet, its string form ("5-5-5") or per-stage block indices.
SubnetLike = Union["Subnet", str, Sequence[Sequence[int]]]


def count_flops(
    model: nn.Module,
    input_size: int | tuple[int, int],
    in_chans: int = 3,
    subnet: SubnetLike | None = None,
) -> int:
    """Forward FLOPs of ``model`` (or of its sub-network ``subnet``) for one image.

    The forward runs on a batch of one zero image in eval mode without grad, on the model's
    device and dtype; every module's train/eval mode is restored afterwards.

    Args:
        model: the model (a DDP or ``torch.compile`` wrapper is looked through).
        input_size: image side, or ``(height, width)``.
        in_chans: input channels.
        subnet: run only this sub-network (a ``Subnet``, its string form such as ``"5-5-5"``,
            or per-stage block indices).

    Raises:
        ConfigError: a non-positive input size or channel count.
    """
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    if min(height, width, in_chans) < 1:
        raise ConfigError(
            f"input size and channels must be positive, got input_size={input_size!r}, "
            f"in_chans={in_chans!r}"
        )
    model = unwrap(model)
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    image = torch.zeros(1, in_chans, height, width, device=device, dtype=dtype)
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.no_grad(), counter:
        if subnet is None:
            model(image)
        else:
            from .elastic.subnet import use_subnet

            with use_subnet(model, subnet):
                model(image)
    return int(counter.get_total_flops())


def count_params(model: nn.Module, subnet: SubnetLike | None = None) -> int:
    """Parameters ``model`` (or its sub-network ``subnet``) uses; shared ones count once."""
    model = unwrap(model)
    if subnet is None:
        return sum(p.numel() for p in model.parameters())
    from .elastic.subnet import use_subnet

    # Inside use_subnet, the skipped blocks are out of the module tree.
    with use_subnet(model, subnet):
        return sum(p.numel() for p in model.parameters())


def motivation_flops(n_base: float, n_mot: float, f_base: float, f_mot: float) -> float:
    """``F_X-Y``: mean forward FLOPs per training step of a motivation run.

    Args:
        n_base: number of base steps (forward passes of the base model).
        n_mot: number of motivated steps.
        f_base: forward FLOPs of the base model.
        f_mot: forward FLOPs of the motivated model.
    """
    if n_base < 0 or n_mot < 0 or n_base + n_mot <= 0:
        raise ConfigError(
            f"step counts must be >= 0 and not both 0, got n_base={n_base!r}, n_mot={n_mot!r}"
        )
    return (n_base * f_base + n_mot * f_mot) / (n_base + n_mot)


def acc_per_flops(acc: float, acc_ref: float, flops: float, flops_ref: float) -> float:
    """Accuracy gained per FLOP added: ``(acc - acc_ref) / (flops - flops_ref)``.

    Raises:
        ConfigError: when ``flops == flops_ref`` (no FLOPs added, the ratio is undefined).
    """
    if flops == flops_ref:
        raise ConfigError(
            f"flops and flops_ref are both {flops!r}: accuracy per added FLOP needs a model "
            "that costs more than the reference"
        )
    return (acc - acc_ref) / (flops - flops_ref)


class AccFlops(NamedTuple):
    """The Motivation paper's efficiency metrics for one base/motivated pair."""

    motivated_training: float  # ACC/FLOPs_X-Y-B
    larger_model: float  # ACC/FLOPs_Y-C
    ratio: float  # ACC/F_Ratio


def acc_flops_ratio(
    acc_xyb: float,
    acc_xc: float,
    acc_yc: float,
    flops_xy: float,
    flops_xc: float,
    flops_yc: float,
) -> AccFlops:
    """ACC/FLOPs of motivation training and of the larger model, and their ratio.

    Args:
        acc_xyb: accuracy of base model X trained with motivated model Y.
        acc_xc: accuracy of X trained classically.
        acc_yc: accuracy of Y trained classically.
        flops_xy: ``F_X-Y`` of the motivation run (:func:`motivation_flops`).
        flops_xc: forward FLOPs of X.
        flops_yc: forward FLOPs of Y.

    Raises:
        ConfigError: equal FLOPs in a difference, or Y no more accurate than X (ratio undefined).
    """
    motivated_training = acc_per_flops(acc_xyb, acc_xc, flops_xy, flops_xc)
    larger_model = acc_per_flops(acc_yc, acc_xc, flops_yc, flops_xc)
    if larger_model == 0:
        raise ConfigError(
            f"acc_yc equals acc_xc ({acc_yc!r}): the larger model gains nothing, so the ratio "
            "is undefined"
        )
    return AccFlops(motivated_training, larger_model, motivated_training / larger_model)
