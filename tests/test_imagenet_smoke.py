"""The ImageNet recipes, as users run them, on a small folder of real ImageNet-sized JPEGs.

Same models (ResNet-50, and ResNet-101 as the motivated model), crops, augmentation, sampling
space, sub-networks and per-epoch sub-network evaluation as the recipes; only the counts
(images, batch, epochs) are overridden. Each run is SIGKILLed in the middle of an epoch, with
DataLoader workers, resumed with --resume, and must leave a complete run folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def imagenet_folder(tmp_path_factory) -> Path:
    """4 classes of JPEGs at ImageNet's sizes (256-500 px a side, any aspect)."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 5), ("val", 2)):
        for c in range(4):
            folder = root / split / f"n0{c}000000"
            folder.mkdir(parents=True)
            for i in range(per_class):
                h, w = (int(v) for v in rng.integers(256, 501, size=2))
                # smooth colour fields with noise, so that JPEG compresses them as photos
                yy, xx = np.mgrid[0:h, 0:w]
                base = np.stack([(xx * (c + 1) + yy) % 256, (yy * 2) % 256, (xx + 64 * c) % 256])
                pixels = (base.transpose(1, 2, 0) + rng.normal(0, 12, (h, w, 3))).clip(0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(
                    folder / f"n0{c}000000_{i}.JPEG", quality=85
                )
    return root


def _train(out: Path, recipe: str, overrides: list[str], resume: bool = False):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "nestedtrain", "train", str(REPO / "recipes" / recipe)]
    command += [*overrides, "--out", str(out)] + (["--resume"] if resume else [])
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _kill_mid_epoch_then_resume(out: Path, recipe: str, overrides: list[str]) -> str:
    proc = _train(out, recipe, overrides)
    last = out / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 400
    # checkpoint.every_steps=1: the first step checkpoint appears after the first step
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    position = torch.load(last, weights_only=False)["position"]
    assert position["epoch"] == 0 and position["step"] >= 1
    resumed = _train(out, recipe, overrides, resume=True)
    stdout, stderr = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, stderr
    assert "took over the stale lock" in stderr  # the killed process left its lock behind
    return stdout


def _assert_complete(out: Path, epochs: int) -> dict:
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "summary.json", "weights.pt", "checkpoints"} <= names
    assert ".lock" not in names
    assert {p.name for p in (out / "checkpoints").iterdir()} >= {"last.pt", "best.pt"}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == list(range(epochs))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == epochs and summary["main_acc"] is not None
    return summary


# 20 training images, 4 held out for validation: 4 steps of 4 images, one epoch
SIZES = [
    "epochs=1",
    "batch_size=4",
    "data.val_size=0.2",
    "data.num_workers=2",
    "data.calib_images=16",
    "eval.batch_size=4",
    "eval.every=1",
    "checkpoint.every_steps=1",
]


@pytest.mark.slow
def test_stpp_resnet50_a1_recipe_survives_a_kill(imagenet_folder, tmp_path):
    overrides = [*SIZES, f"data.root={imagenet_folder}", "eval.subnets=sample:3"]
    out = tmp_path / "stpp"
    stdout = _kill_mid_epoch_then_resume(out, "stpp_imagenet_resnet50_a1.yaml", overrides)
    summary = _assert_complete(out, epochs=1)
    config = (out / "config.yaml").read_text()
    for setting in ("name: resnet50", "num_subnets: 6", "kl_norm: std", "space: space3"):
        assert setting in config
    assert len(summary["subnets"]) == 3 and "subnet" in stdout


@pytest.mark.slow
def test_motivation_resnet50_101_recipe_survives_a_kill(imagenet_folder, tmp_path):
    overrides = [*SIZES, f"data.root={imagenet_folder}", "eval.subnets=sample:2"]
    out = tmp_path / "motivation"
    _kill_mid_epoch_then_resume(out, "motivation_imagenet_resnet50_101.yaml", overrides)
    summary = _assert_complete(out, epochs=1)
    assert (out / "base.pt").is_file() and (out / "motivated.pt").is_file()
    assert summary["base_steps"] + summary["motivated_steps"] == 4
