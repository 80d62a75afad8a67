"""Augmentations: whole uint8 batches on the device, and timm/torchvision transforms per image.

Random numbers never come from the trainer's global RNG streams. Device-side crops and flips
draw from a ``torch.Generator`` the caller seeds; timm's and torchvision's transforms draw
from the global RNGs, so they run inside ``seeding.host_rng_scope``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import auto_augment as timm_auto_augment
from timm.data.transforms import RandomResizedCropAndInterpolation
from timm.data.transforms_factory import transforms_imagenet_eval, transforms_imagenet_train
from torchvision import transforms as T
from torchvision.ops import roi_align
from torchvision.transforms import functional as TF

from ..errors import ConfigError
from .seeding import host_rng_scope

__all__ = [
    "BatchColorJitter",
    "apply_pil_transform",
    "build_pil_augment",
    "folder_eval_transform",
    "folder_train_transform",
    "normalize",
    "pca_lighting_offset",
    "random_pad_crop_flip",
    "random_resized_crop_flip",
    "resize",
    "to_device",
    "to_uint8",
    "uniform_augment",
]

TRIVIAL_AUGMENT = "trivialaugment"
UNIFORM_AUGMENT = "uniformaugment"
_AA_HELP = (
    "use a timm string such as 'rand-m9-mstd0.5-inc1' (RandAugment), 'original' or 'v0r' "
    f"(AutoAugment), 'augmix-m5-w4-d2' (AugMix), {TRIVIAL_AUGMENT!r} or {UNIFORM_AUGMENT!r}"
)

# UniformAugment's operations (LingChen et al. 2020; the ST++ reference code's A2 recipe), as
# timm names them; timm's ranges at magnitude 10 are the paper's (shear 0.3, translate 0.45 of
# the side, rotate 30°, posterize 4-8 bits, enhance 0.1-1.9, solarize 0-256).
_UNIFORM_AUGMENT_OPS = (
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
    "Rotate",
    "AutoContrast",
    "Invert",
    "Equalize",
    "Solarize",
    "PosterizeOriginal",
    "Contrast",
    "Color",
    "Brightness",
    "Sharpness",
)

# ImageNet's RGB principal components (eigenvalues, and eigenvectors as rows per channel), the
# constants of AlexNet's lighting noise as fb.resnet.torch and the ST++ reference code use them.
_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
_PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the CPU) on ``device`` without making the host wait: on CUDA through
    pinned memory, a copy that is queued on the stream (a pageable copy blocks the host until
    the GPU has done everything queued before it)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (or float in 0..255) ``(N, C, H, W)`` -> float32 normalised with ``mean``/``std`` of [0, 1] data."""
    shape = (1, len(mean), 1, 1)
    mean255 = to_device(torch.tensor(mean), images.device).view(shape) * 255.0
    std255 = to_device(torch.tensor(std), images.device).view(shape) * 255.0
    return (images.float() - mean255) / std255


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (antialiased) resize of a batch to ``size`` x ``size``; float out, values kept 0..255."""
    if images.shape[-2:] == (size, size):
        return images.float()
    return F.interpolate(
        images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Round float pixel values (0..255) back to uint8."""
    return images.round().clamp_(0, 255).to(torch.uint8)


def random_pad_crop_flip(
    images: torch.Tensor, padding: int, hflip: float, generator: torch.Generator
) -> torch.Tensor:
    """Per image: random crop of the zero-padded image at the original size, random h-flip.

    torchvision's RandomCrop and RandomHorizontalFlip draw one set of parameters for a whole
    batch tensor, so the per-image version is written here: one gather with per-image row and
    column indices (a flipped image reads its columns backwards).
    """
    n, c, h, w = images.shape
    device = images.device
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < hflip
    padded = F.pad(images, (padding,) * 4) if padding > 0 else images
    rows = to_device(dy[:, None] + torch.arange(h), device)
    cols = dx[:, None] + torch.arange(w)
    cols = to_device(torch.where(flip[:, None], cols.flip(1), cols), device)
    batch_index = torch.arange(n, device=device)[:, None, None, None]
    chan_index = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch_index, chan_index, rows[:, None, :, None], cols[:, None, None, :]]


def random_resized_crop_flip(
    images: torch.Tensor,
    size: int,
    hflip: float,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    attempts: int = 10,
) -> torch.Tensor:
    """Per image: torchvision's RandomResizedCrop box rule, resized to ``size``, random h-flip.

    The boxes follow ``RandomResizedCrop.get_params`` (10 tries of area and log-aspect, else the
    whole image, which is its fallback for square images), drawn for the whole batch at once;
    ``torchvision.ops.roi_align`` then crops and resizes every image to its own box in one
    call, bilinear, averaging several samples per output pixel where the box is larger.
    """
    n, _, h, w = images.shape
    area = h * w
    target_area = area * (
        scale[0] + (scale[1] - scale[0]) * torch.rand(n, attempts, generator=generator)
    )
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, attempts, generator=generator))
    box_w = torch.sqrt(target_area * aspect).round()
    box_h = torch.sqrt(target_area / aspect).round()
    fits = (box_w > 0) & (box_w <= w) & (box_h > 0) & (box_h <= h)
    first = fits.to(torch.uint8).argmax(dim=1)
    rows = torch.arange(n)
    any_fit = fits.any(dim=1)
    box_w = torch.where(any_fit, box_w[rows, first], torch.tensor(float(w)))
    box_h = torch.where(any_fit, box_h[rows, first], torch.tensor(float(h)))
    top = torch.floor(torch.rand(n, generator=generator) * (h - box_h + 1))
    left = torch.floor(torch.rand(n, generator=generator) * (w - box_w + 1))
    flip = torch.rand(n, generator=generator) < hflip
    boxes = torch.stack([rows.float(), left, top, left + box_w, top + box_h], dim=1)
    out = roi_align(
        images.float(),
        to_device(boxes, images.device),
        output_size=(size, size),
        spatial_scale=1.0,
        sampling_ratio=-1,
        aligned=True,  # boxes in pixel-edge coordinates: [left, left + w) covers w pixels
    )
    out = torch.where(to_device(flip, images.device)[:, None, None, None], out.flip(3), out)
    return to_uint8(out)


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    # Pillow < 13 posterized to 0 bits as a black image; Pillow 13 raises instead. timm's
    # policies do ask for 0 bits ('v0' Posterize at level 2, RandAugment's PosterizeIncreasing
    # at magnitude 10, which 'mstd' noise reaches), so keep the old result.
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return timm_auto_augment.posterize(img, bits_to_keep, **kwargs)


def _allow_zero_bit_posterize(transform: T.Compose) -> None:
    # Swaps the op on our own transform objects only; timm's module stays as it is.
    for stage in transform.transforms:
        ops = list(getattr(stage, "ops", []))  # RandAugment, AugMix
        for sub_policy in getattr(stage, "policy", []):  # AutoAugment
            ops.extend(sub_policy)
        for op in ops:
            if op.aug_fn is timm_auto_augment.posterize:
                op.aug_fn = _posterize


def uniform_augment(mean: Sequence[float]) -> Callable[[Image.Image], Image.Image]:
    """UniformAugment: two operations drawn uniformly (with replacement) from its 14, each
    applied with probability 0.5 at a magnitude drawn uniformly from its whole range.

    Built from timm's RandAugment pieces (``magnitude_std=inf`` is timm's uniform magnitude);
    neither timm nor torchvision ships the policy itself.
    """
    hparams = {
        "img_mean": tuple(min(255, round(255 * m)) for m in mean),
        "magnitude_std": float("inf"),
    }
    ops = timm_auto_augment.rand_augment_ops(
        magnitude=10, prob=0.5, hparams=hparams, transforms=list(_UNIFORM_AUGMENT_OPS)
    )
    return timm_auto_augment.RandAugment(ops, num_layers=2)


class BatchColorJitter:
    """torchvision's ``ColorJitter`` (brightness, contrast, saturation) on a uint8 batch, with
    each image's own factors and order as ``jitter.get_params`` drew them.

    By hand because torchvision's ``adjust_*`` take one factor per call, and a call per image
    costs the main process about 0.3 ms of dispatch (measured on the CPU on 8-px images),
    more than decoding on the device saves. The arithmetic is torchvision's tensor path: blend
    in float32 with the factor and its complement rounded from double, clamp, back to uint8
    after every operation; greyscale from ``rgb_to_grayscale``.
    """

    def __init__(self, jitter: T.ColorJitter):
        if jitter.hue is not None:
            raise ValueError("BatchColorJitter has no hue: use ColorJitter per image")
        self.jitter = jitter

    def draw(self) -> tuple[tuple[int, ...], float | None, float | None, float | None]:
        """One image's order and factors, from the global RNGs as ``ColorJitter`` draws them."""
        order, b, c, s, _ = self.jitter.get_params(
            self.jitter.brightness, self.jitter.contrast, self.jitter.saturation, None
        )
        return tuple(int(i) for i in order), b, c, s

    def __call__(self, images: torch.Tensor, params: Sequence[tuple]) -> torch.Tensor:
        out = images.clone()
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (order, *_) in enumerate(params):
            groups.setdefault(order, []).append(i)
        # One copy to the device for the whole batch, pinned and queued on CUDA (a tensor per
        # group and operation made two dozen blocking copies): row r holds the place of the
        # r-th image in group order (exact in float64) and its three factors.
        members = [i for group in groups.values() for i in group]
        table = torch.tensor(
            [[i, *(math.nan if f is None else f for f in params[i][1:4])] for i in members],
            dtype=torch.float64,
        )
        table = to_device(table, images.device)
        index, factors = table[:, 0].long(), table[:, 1:]
        start = 0
        for order, group in groups.items():
            rows = slice(start, start + len(group))
            start = rows.stop
            x = out[index[rows]]
            for op in order:
                if op == 3 or params[group[0]][1 + op] is None:
                    continue  # no hue; an unset component draws no factor
                x = self._adjust(x, op, factors[rows, op])
            out[index[rows]] = x
        return out

    @staticmethod
    def _adjust(x: torch.Tensor, op: int, factors: torch.Tensor) -> torch.Tensor:
        ratio = factors.view(-1, 1, 1, 1)  # float64, as torchvision's Python float factor
        if op == 0:  # brightness: blend with black
            other = torch.zeros((), dtype=torch.float32, device=x.device)
        elif op == 1:  # contrast: blend with the mean grey level
            other = TF.rgb_to_grayscale(x).float().mean(dim=(-3, -2, -1), keepdim=True)
        else:  # saturation: blend with the greyscale image
            other = TF.rgb_to_grayscale(x)
        blended = ratio.float() * x + (1.0 - ratio).float() * other
        return blended.clamp(0, 255).to(x.dtype)


def pca_lighting_offset(alpha: torch.Tensor) -> torch.Tensor:
    """The per-channel RGB offset of AlexNet's lighting noise for weights ``alpha`` (..., 3):
    ``eigvec @ (alpha * eigval)`` on images in [0, 1]."""
    eigval = torch.tensor(_PCA_EIGVAL, dtype=alpha.dtype, device=alpha.device)
    eigvec = torch.tensor(_PCA_EIGVEC, dtype=alpha.dtype, device=alpha.device)
    return (alpha * eigval) @ eigvec.T


def build_pil_augment(
    auto_augment: str | None,
    color_jitter: float,
    img_size: int,
    mean: Sequence[float],
) -> Callable[[Image.Image], Image.Image] | None:
    """The per-image photometric stage (AutoAugment family, colour jitter) as timm builds it.

    As in timm, colour jitter is off when an AutoAugment-family policy is on, except with
    ``uniformaugment``, which the ST++ reference code runs before colour jitter. Returns None when
    there is nothing to do.

    Raises:
        ConfigError: when ``auto_augment`` is not a string timm (or "trivialaugment") knows.
    """
    if auto_augment == TRIVIAL_AUGMENT:
        return T.TrivialAugmentWide()
    jitter = float(color_jitter) if color_jitter > 0 else None
    if auto_augment == UNIFORM_AUGMENT:
        # The ST++ A2 recipe adds UniformAugment to A1's colour jitter: both, in this order.
        stages = [uniform_augment(mean)]
        stages += [T.ColorJitter(jitter, jitter, jitter)] if jitter else []
        return T.Compose(stages)
    try:
        _, secondary, _ = transforms_imagenet_train(
            img_size,
            color_jitter=jitter,
            auto_augment=auto_augment or None,
            interpolation="bilinear",
            mean=tuple(mean),
            separate=True,
        )
    except (AssertionError, ValueError, KeyError) as err:
        # timm rejects unknown strings with bare asserts.
        raise ConfigError(
            f"data.auto_augment={auto_augment!r} is not known ({err}): {_AA_HELP}"
        ) from None
    _allow_zero_bit_posterize(secondary)
    return secondary if secondary.transforms else None


def apply_pil_transform(
    images: torch.Tensor, transform: Callable[[Image.Image], Image.Image], seed: int
) -> torch.Tensor:
    """Run a PIL transform on every image of a uint8 batch, seeded by ``seed``.

    timm's AutoAugment family exists only for PIL images, so this stage goes through the host
    one image at a time; everything else in the on-device path stays batched on the device.
    """
    host = images.permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(host)
    with host_rng_scope(seed):
        for i, image in enumerate(host):
            pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
            out[i] = np.asarray(transform(pil)).reshape(image.shape)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().to(images.device)


def folder_train_transform(
    img_size: int,
    crop: str,
    crop_padding: int,
    hflip: float,
    pil_augment: Callable[[Image.Image], Image.Image] | None,
) -> T.Compose:
    """Training transform for images read from disk, up to a uint8 tensor: crop and flip,
    photometric. Normalisation, lighting noise and erasing follow on the device, a batch at
    a time (``Data._finish``): a worker sends a quarter of the bytes of float32 images, and
    the GPU does the float work."""
    if crop == "rrc":
        geometric: list[Callable] = [
            RandomResizedCropAndInterpolation(img_size, interpolation="bilinear")
        ]
    else:
        geometric = [T.Resize(img_size), T.CenterCrop(img_size)]
        if crop == "pad" and crop_padding > 0:
            geometric.append(T.RandomCrop(img_size, padding=crop_padding))
    if hflip > 0:
        geometric.append(T.RandomHorizontalFlip(hflip))
    photometric = [pil_augment] if pil_augment is not None else []
    return T.Compose(geometric + photometric + [T.PILToTensor()])


def folder_eval_transform(img_size: int, crop_pct: float) -> T.Compose:
    """timm's evaluation transform (resize to ``img_size / crop_pct``, centre crop) up to a
    uint8 tensor; normalised on the device."""
    steps = transforms_imagenet_eval(img_size, crop_pct=crop_pct, interpolation="bilinear")
    # timm's ends with its to-tensor and normalise steps: keep what comes before them
    kept = []
    for step in steps.transforms:
        if "ToTensor" in type(step).__name__:
            break
        kept.append(step)
    return T.Compose([*kept, T.PILToTensor()])
