"""Long jobs: step checkpoints, exact mid-epoch resume, stop signals, the run lock, divergence."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nestedtrain as nt
from nestedtrain.engine.runfolder import RunLock
from nestedtrain.engine.trainer import Trainer
from nestedtrain.errors import (
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    TrainingDiverged,
    TrainingInterrupted,
)

# digits, 256 training images in batches of 32: 8 steps an epoch
SMALL = ["data.train_subset=256", "batch_size=32", "eval.subnets=sample:2", "optim.lr=0.05"]
REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "digits_ct.yaml")  # with model.name=resnet20 below


def _cfg(*overrides):
    return nt.load_config(None, [*SMALL, *overrides])


class _Kill(Exception):
    """Stands for SIGKILL: the process is gone after this step, nothing else runs."""


def _kill_at(epoch: int, step: int):
    def hook(e: int, s: int) -> None:
        if (e, s) == (epoch, step):
            raise _Kill

    return hook


def _assert_same_run(a: Path, b: Path) -> None:
    """Every tensor of the final checkpoints equal, and the same logged losses."""
    last_a = torch.load(a / "checkpoints" / "last.pt", weights_only=False)
    last_b = torch.load(b / "checkpoints" / "last.pt", weights_only=False)

    def tensors(value, prefix=""):
        if isinstance(value, torch.Tensor):
            yield prefix, value
        elif isinstance(value, dict):
            for key, item in value.items():
                yield from tensors(item, f"{prefix}.{key}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                yield from tensors(item, f"{prefix}[{i}]")

    for key in ("model", "method", "ema"):
        left, right = dict(tensors(last_a[key])), dict(tensors(last_b[key]))
        assert left.keys() == right.keys()
        unequal = [k for k in left if not torch.equal(left[k], right[k])]
        assert not unequal, f"{key}: {unequal[:5]}"
    weights_a, weights_b = torch.load(a / "weights.pt"), torch.load(b / "weights.pt")
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)

    def losses(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [(json.loads(x)["epoch"], json.loads(x)["loss"]) for x in lines]

    assert losses(a) == losses(b)


METHODS = {
    "ct": ["method=ct"],
    "st": ["method=st", "ema=true", "ema_decay=0.9"],
    "stpp": ["method=stpp", "st.num_subnets=2"],
    "sandwich": ["method=sandwich", "st.num_subnets=1", "model.drop_path_rate=0.2"],
    "motivation": [
        "method=motivation",
        "motivation.model=resnet32",
        "eval.subnets=none",
        "motivation.k=1",
    ],
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_kill_mid_epoch_and_resume_is_bit_identical(tmp_path, method):
    overrides = [*METHODS[method], "epochs=2", "checkpoint.every_steps=3", "data.hflip=0.5"]
    nt.train(_cfg(*overrides), tmp_path / "straight")
    # Killed at step 6 of epoch 2: the last checkpoint is at its step 4 (global step 12), so
    # the resumed run redoes two steps, with the same images, draws and optimizer state.
    with pytest.raises(_Kill):
        Trainer(_cfg(*overrides), tmp_path / "killed").fit(step_hook=_kill_at(1, 6))
    state = torch.load(tmp_path / "killed" / "checkpoints" / "last.pt", weights_only=False)
    assert state["position"] == {"epoch": 1, "step": 4}
    assert state["partial"]["step"] == 4
    nt.train(_cfg(*overrides), tmp_path / "killed", resume=True)
    _assert_same_run(tmp_path / "straight", tmp_path / "killed")
    if method == "motivation":
        a = json.loads((tmp_path / "straight" / "summary.json").read_text())
        b = json.loads((tmp_path / "killed" / "summary.json").read_text())
        keys = ("motivated_steps", "base_steps", "switches", "flops_per_image")
        assert [a[k] for k in keys] == [b[k] for k in keys]
        assert a["motivated_steps"] > 0


def _write_jpeg_tree(root: Path, classes: int, per_class: int, sizes=(40, 56)) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", max(2, per_class // 4))):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = int(rng.integers(*sizes)), int(rng.integers(*sizes))
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                pixels[..., c % 3] //= 2  # something to learn
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def test_imagefolder_with_workers_resumes_bit_identical(tmp_path):
    root = _write_jpeg_tree(tmp_path / "images", classes=3, per_class=12)
    overrides = [
        "method=st",
        "data.name=imagefolder",
        f"data.root={root}",
        "data.img_size=24",
        "data.num_workers=2",
        "data.color_jitter=0.4",
        "data.val_size=0",
        "data.calib_images=8",
        "data.train_subset=null",
        "batch_size=6",  # 36 images: 6 steps an epoch
        "epochs=2",
        "checkpoint.every_steps=2",
    ]
    nt.train(_cfg(*overrides), tmp_path / "straight")
    with pytest.raises(_Kill):
        Trainer(_cfg(*overrides), tmp_path / "killed").fit(step_hook=_kill_at(0, 3))
    nt.train(_cfg(*overrides), tmp_path / "killed", resume=True)
    _assert_same_run(tmp_path / "straight", tmp_path / "killed")


def test_sigterm_stops_after_the_step_and_resume_is_exact(tmp_path):
    overrides = ["method=st", "epochs=2"]
    nt.train(_cfg(*overrides), tmp_path / "straight")

    def terminate(epoch, step):
        if (epoch, step) == (0, 5):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted) as stopped:
        Trainer(_cfg(*overrides), tmp_path / "stopped").fit(step_hook=terminate)
    assert (stopped.value.signal_name, stopped.value.epoch, stopped.value.step) == (
        "SIGTERM",
        0,
        5,
    )
    assert stopped.value.exit_status == EXIT_INTERRUPTED
    state = torch.load(tmp_path / "stopped" / "checkpoints" / "last.pt", weights_only=False)
    assert state["position"] == {"epoch": 0, "step": 5}
    assert not (tmp_path / "stopped" / ".lock").exists()
    # the handler is gone with the run: SIGTERM's default action is back
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    nt.train(_cfg(*overrides), tmp_path / "stopped", resume=True)
    _assert_same_run(tmp_path / "straight", tmp_path / "stopped")


def _cli(*args, timeout=300, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "nestedtrain", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


def test_cli_sigusr1_exits_75_and_resume_finishes_exactly(tmp_path):
    overrides = [*SMALL, "model.name=resnet20", "method=st", "epochs=3", "eval.subnets=none"]
    overrides.append("checkpoint.every_steps=4")
    straight = _cli("train", "--out", str(tmp_path / "straight"), RECIPE, *overrides)
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    run = tmp_path / "stopped"
    proc = _cli("train", "--out", str(run), RECIPE, *overrides)
    # wait for the first step checkpoint, then signal whatever step it is at
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    status = proc.wait(timeout=120)
    stderr = proc.stderr.read()
    assert status == EXIT_INTERRUPTED, stderr
    assert "SIGUSR1: stopped after step" in stderr and "--resume" in stderr
    resumed = _cli("train", "--out", str(run), "--resume", RECIPE, *overrides)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    _assert_same_run(tmp_path / "straight", run)


def test_nan_loss_stops_with_the_step_and_term_and_keeps_finite_checkpoints(tmp_path):
    trainer = Trainer(_cfg("method=st", "epochs=3", "log_every=4"), tmp_path / "run")
    step = trainer.method.step
    seen = {"steps": 0}

    def poisoned(images, labels):
        seen["steps"] += 1
        if seen["steps"] == 8 + 2:  # epoch 2, step 2
            images = images * float("nan")
        return step(images, labels)

    trainer.method.step = poisoned
    with pytest.raises(TrainingDiverged) as diverged:
        trainer.fit()
    err = diverged.value
    assert (err.epoch, err.step, err.term) == (1, 2, "ce") and not np.isfinite(err.value)
    assert "step 2 of epoch 2" in str(err) and "\n" not in str(err)
    assert err.exit_status == EXIT_DIVERGED
    # detected at the log check of step 4; the checkpoint is still epoch 1's, finite
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert state["position"] == {"epoch": 1, "step": 0}
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "weights.pt").exists()
    assert not (tmp_path / "run" / ".lock").exists()


def test_cli_divergence_is_one_line_and_exit_3(tmp_path):
    proc = _cli(
        "train",
        "--out",
        str(tmp_path / "run"),
        RECIPE,
        *SMALL,
        "model.name=resnet20",
        "epochs=2",
        "optim.lr=1e30",
        "eval.subnets=none",
    )
    status = proc.wait(timeout=300)
    stderr = proc.stderr.read().strip()
    assert status == EXIT_DIVERGED, stderr
    assert stderr.startswith("nestedtrain: training diverged: loss term")
    assert len(stderr.splitlines()) == 1


def test_a_second_process_on_the_same_folder_fails_in_one_line(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out.mkdir()
        (out / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        proc = _cli("train", "--out", str(out), RECIPE, *SMALL, "model.name=resnet20", "epochs=1")
        assert proc.wait(timeout=120) == 2
        stderr = proc.stderr.read().strip()
        assert f"being written by pid {holder.pid}" in stderr and len(stderr.splitlines()) == 1
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()


def test_stale_locks_are_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / ".lock"
    # a process of this host that is gone
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with RunLock(tmp_path) as held:
        assert held.took_over["pid"] == dead.pid
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()
    # another host's lock: stale once its owner stopped refreshing it
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(ValueError, match="pid 1 on elsewhere"):
        RunLock(tmp_path, stale_after=60).acquire()
    old = time.time() - 120
    os.utime(lock, (old, old))
    with RunLock(tmp_path, stale_after=60) as held:
        assert held.took_over["host"] == "elsewhere"


_DIST_STOP = """
import json, os, signal, sys
import torch.distributed as dist
import nestedtrain as nt
from nestedtrain.errors import TrainingInterrupted
from nestedtrain.engine.trainer import Trainer

out, resume = sys.argv[1], sys.argv[2] == "resume"
trainer = Trainer(nt.load_config(None, sys.argv[3:]), out, resume=resume)
rank = dist.get_rank()

def hook(epoch, step):
    if not resume and rank == 1 and (epoch, step) == (0, 3):
        os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is told

try:
    trainer.fit(progress=False, step_hook=hook)
    stopped = None
except TrainingInterrupted as err:
    stopped = {"signal": err.signal_name, "epoch": err.epoch, "step": err.step}
with open(f"{out}/stop{rank}-{sys.argv[2]}.json", "w") as f:
    json.dump(stopped, f)
"""


@pytest.mark.slow
def test_torchrun_ranks_stop_at_the_same_step(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_DIST_STOP)
    out = tmp_path / "run"
    overrides = [
        "method=st",
        "model.name=vit_tiny_patch16_224",
        "model.kwargs={img_size: 8, patch_size: 4, depth: 2}",
        "data.train_subset=192",
        "batch_size=8",  # 24 steps an epoch; ranks agree on stopping every 20 steps
        "epochs=2",
        "eval.subnets=none",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for phase in ("first", "resume"):
        subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
            + ["--standalone", str(script), str(out), phase, *overrides],
            check=True,
            env=env,
            timeout=300,
        )
    first = [json.loads((out / f"stop{r}-first.json").read_text()) for r in (0, 1)]
    assert first[1] == {"signal": "SIGUSR1", "epoch": 0, "step": 20}
    assert first[0] == {"signal": "a stop signal to another rank", "epoch": 0, "step": 20}
    assert [json.loads((out / f"stop{r}-resume.json").read_text()) for r in (0, 1)] == [None] * 2
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1]


def test_collapsed_float16_loss_scale_is_divergence(tmp_path):
    # GradScaler halves its scale on every step with non-finite gradients; CUDA-only, so a
    # stand-in with the same get_scale() shows the check.
    class CollapsedScaler:
        def get_scale(self) -> float:
            return 2.0**-12

    trainer = Trainer(_cfg("epochs=1"), tmp_path / "run")
    trainer.precision.scaler = CollapsedScaler()
    with pytest.raises(TrainingDiverged, match="loss scale fell to 0.00024"):
        trainer._check_finite()
