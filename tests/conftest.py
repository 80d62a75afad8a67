from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import nestedtrain as nt
from nestedtrain.data import DataConfig, build_data

# Tiny instances of every built-in family: (name, kwargs, input side).
FAMILIES = {
    "cifar-resnet20": ("resnet20", {"num_classes": 10}, 16),
    "timm-resnet18": ("resnet18", {"num_classes": 7}, 32),
    "timm-resnet50": ("resnet50", {"num_classes": 7}, 32),
    "timm-mobilenetv3": ("mobilenetv3_small_050", {"num_classes": 7}, 32),
    "timm-efficientnet_b0": ("efficientnet_b0", {"num_classes": 7}, 32),
    "timm-vit_tiny": (
        "vit_tiny_patch16_224",
        {"num_classes": 7, "img_size": 32, "patch_size": 8},
        32,
    ),
}


def perturb_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm layer random affine parameters and statistics.

    timm zero-initialises the last norm of each residual branch, which makes every block an
    identity at init; a test of sub-networks on such a model would prove nothing.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


class ListStageNet(nn.Module):
    """A user model whose stage is a ModuleList its forward loops over (no container call):
    its forward cannot be split into stem, blocks and head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage = nn.ModuleList(
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            for _ in range(3)
        )
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        for block in self.stage:
            x = x + block(x)
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions on a shared 2-core machine: one thread avoids spinning workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(family: str, seed: int = 0) -> tuple[nn.Module, int]:
    name, kwargs, side = FAMILIES[family]
    torch.manual_seed(seed)
    model = nt.create_model(name, **kwargs)
    return perturb_norms(model, seed), side


@pytest.fixture(params=sorted(FAMILIES))
def family_model(request):
    model, side = make_model(request.param)
    return request.param, model, side


class UserBlock(nn.Module):
    """A residual block of a user's model: identity shortcut, so it can be skipped."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x)))


class UserResNet(nn.Module):
    """A user's two-stage residual model that nestedtrain knows only through declare_stages
    (see declare_user_resnet); the second stage starts with a down-sampling convolution."""

    def __init__(self, depths: tuple[int, int] = (2, 2), width: int = 8, in_chans: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1), nn.BatchNorm2d(width))
        self.first = nn.Sequential(*(UserBlock(width) for _ in range(depths[0])))
        down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.second = nn.Sequential(down, *(UserBlock(2 * width) for _ in range(depths[1] - 1)))
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x):
        return self.head(self.second(self.first(self.stem(x))).mean((2, 3)))


def declare_user_resnet() -> None:
    nt.declare_stages(UserResNet, ["first", "second"], skippable=lambda b: isinstance(b, UserBlock))


@pytest.fixture(scope="module")
def digits():
    """The digits data set: batches of 64, no crop, on the CPU."""
    return build_data(DataConfig(crop="none"), batch_size=64, seed=0, device=torch.device("cpu"))


def random_batch_lists(
    side: int, chans: int = 1, classes: int = 10, n_eval: int = 150, n_calib: int = 100
):
    """Fixed random eval and calibration data, as the two callables the analyses take (lists:
    eval batches of 64, calibration batches of 48)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n_eval, chans, side, side, generator=g)
    y = torch.randint(0, classes, (n_eval,), generator=g)
    c = torch.randn(n_calib, chans, side, side, generator=g)
    return (
        lambda: [(x[i : i + 64], y[i : i + 64]) for i in range(0, n_eval, 64)],
        lambda: [c[i : i + 48] for i in range(0, n_calib, 48)],
    )


def perturbed_resnet(name: str = "resnet20", seed: int = 0, **kwargs) -> nn.Module:
    """One of our CIFAR ResNets for 1-channel images, seeded, with non-default BN."""
    torch.manual_seed(seed)
    return perturb_norms(nt.create_model(name, num_classes=10, in_chans=1, **kwargs), seed)


def crash_after_first_epoch_then_resume(monkeypatch, make_cfg, out) -> None:
    """Train ``make_cfg()`` into ``out``, crash right after epoch 0's checkpoint is saved,
    then resume it to the end."""
    from nestedtrain.engine.trainer import Trainer

    original = Trainer._save

    def crash_after_first_epoch(self, epoch, is_best):
        original(self, epoch, is_best)
        if epoch == 0:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(Trainer, "_save", crash_after_first_epoch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        nt.train(make_cfg(), out)
    monkeypatch.setattr(Trainer, "_save", original)
    nt.train(make_cfg(), out, resume=True)


def torchrun_two(script, *args: str) -> None:
    """``torchrun --nproc_per_node 2 --standalone SCRIPT ARGS`` (a free port on localhost),
    one thread per rank; raises if a rank fails or it takes over 5 minutes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--standalone", str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, timeout=300)
