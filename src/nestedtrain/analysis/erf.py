"""Effective receptive field (ERF): how much each input pixel moves the centre of the last
feature map (Fig. 6 of ST++, after the visualisation of Ding et al., RepLKNet).

For each image: the gradient of the centre unit of ``forward_features`` (summed over
channels) with respect to the input, its absolute value summed over input channels; the map
is the mean over images. BN runs in eval mode, so images do not interact and one backward
pass serves a whole batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import bn as bn_tools
from ..elastic.stages import unwrap
from ..elastic.subnet import Subnet, use_subnet
from ..errors import ConfigError
from ..evaluation import CalibBatches
from ..modes import kept_modes

__all__ = ["effective_receptive_field", "erf_area_ratios"]


def effective_receptive_field(
    model: nn.Module,
    batches: Iterable[torch.Tensor | Sequence[torch.Tensor]],
    input_size: int | None = None,
    num_images: int | None = None,
    subnet: Subnet | str | None = None,
    calib_batches: CalibBatches | None = None,
) -> np.ndarray:
    """The ERF map ``(H, W)`` of ``model`` (or of its sub-network ``subnet``).

    Args:
        model: a network whose ``forward_features`` returns a ``(N, C, h, w)`` feature map.
        batches: images, or ``(images, labels)`` pairs.
        input_size: resize the images (bilinear) to this side first; ``None`` keeps them.
        num_images: use at most this many images.
        subnet: analyse this sub-network; its BN statistics are re-estimated from
            ``calib_batches`` first (and the model's are restored afterwards).
        calib_batches: training images, required with ``subnet``.

    Raises:
        ConfigError: no ``forward_features``, a feature map that is not 4-D, no images, a
            ``subnet`` without ``calib_batches``, a bad size.
    """
    model = unwrap(model)
    _check_arguments(model, input_size, num_images, subnet, calib_batches)
    saved = bn_tools.save_stats(model)
    total: torch.Tensor | None = None
    seen = 0
    with kept_modes(model):
        try:
            if subnet is not None:
                bn_tools.recalibrate(model, calib_batches(), subnet)
            model.eval()
            for batch in batches:
                images = batch if isinstance(batch, torch.Tensor) else batch[0]
                if num_images is not None:
                    images = images[: num_images - seen]
                if images.shape[0] == 0:
                    break
                if input_size is not None and images.shape[-1] != input_size:
                    images = F.interpolate(
                        images, size=(input_size, input_size), mode="bilinear", align_corners=False
                    )
                grad = _input_gradient(model, images, subnet)
                part = grad.abs().sum(dim=1).sum(dim=0).double().cpu()
                total = part if total is None else total + part
                seen += images.shape[0]
                if num_images is not None and seen >= num_images:
                    break
        finally:
            bn_tools.load_stats(model, saved)
    if total is None:
        raise ConfigError("effective_receptive_field got no images")
    return (total / seen).numpy()


def _check_arguments(
    model: nn.Module,
    input_size: int | None,
    num_images: int | None,
    subnet: Subnet | str | None,
    calib_batches: CalibBatches | None,
) -> None:
    """Raise a ConfigError for the bad arguments :func:`effective_receptive_field` can tell
    before it runs the model."""
    if not callable(getattr(model, "forward_features", None)):
        raise ConfigError(
            f"{type(model).__name__} has no forward_features(): the ERF needs the last feature "
            "map (timm models and nestedtrain's CIFAR ResNets have it)"
        )
    if input_size is not None and input_size < 1:
        raise ConfigError(f"input_size={input_size} must be >= 1")
    if num_images is not None and num_images < 1:
        raise ConfigError(f"num_images={num_images} must be >= 1")
    if subnet is not None and calib_batches is None:
        raise ConfigError("an ERF of a sub-network needs calib_batches to re-estimate its BNs")


def _input_gradient(
    model: nn.Module, images: torch.Tensor, subnet: Subnet | str | None
) -> torch.Tensor:
    x = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        if subnet is None:
            features = model.forward_features(x)
        else:
            with use_subnet(model, subnet):
                features = model.forward_features(x)
        if not isinstance(features, torch.Tensor) or features.dim() != 4:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features)
            raise ConfigError(
                f"{type(model).__name__}.forward_features returned {shape}; the ERF needs a "
                "convolutional (N, C, h, w) feature map"
            )
        h, w = features.shape[-2:]
        # Each image's centre unit depends on that image only (eval mode), so the gradient of
        # the batch sum is every image's own gradient.
        centre = features[:, :, h // 2, w // 2].sum()
        (grad,) = torch.autograd.grad(centre, x)
    return grad


def erf_area_ratios(
    erf: np.ndarray, thresholds: Sequence[float] = (0.2, 0.3, 0.5, 0.99)
) -> dict[str, float]:
    """For each threshold t: the area of the smallest centred square holding a fraction t of
    the total contribution, as a fraction of the image (as RepLKNet reports its ERFs).

    Larger means the contribution spreads wider.
    """
    height, width = erf.shape
    total = float(erf.sum())
    if total <= 0:
        return {f"{t:g}": 0.0 for t in thresholds}
    cy, cx = height // 2, width // 2
    sums = []
    for r in range(max(height, width)):
        window = erf[max(cy - r, 0) : cy + r + 1, max(cx - r, 0) : cx + r + 1]
        sums.append((float(window.sum()) / total, window.size / erf.size))
    out = {}
    for t in thresholds:
        out[f"{t:g}"] = next((area for share, area in sums if share >= t - 1e-12), 1.0)
    return out
