"""What ranks must agree on under torchrun (2 gloo processes on the CPU): BN statistics,
the ST step's path, the checkpoint to resume from, when to stop; and what they must not
share: dropout masks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nestedtrain as nt
from nestedtrain.data import build_data
from nestedtrain.engine import loop as loop_module
from nestedtrain.engine.build import load_model
from nestedtrain.engine.evaluate import evaluate
from nestedtrain.engine.faults import TrainingInterrupted
from nestedtrain.engine.trainer import Trainer

# digits, 256 training images in global batches of 64: 4 steps an epoch, 32 images a rank
SMALL = ["data.train_subset=256", "batch_size=64", "optim.lr=0.05", "eval.subnets=sample:2"]
ST_RESNET = [*SMALL, "method=st", "model.name=resnet20"]

# argv: run folder, mode, recipe overrides. Each rank saves its model (and, in mode dropout,
# the zero pattern of one dropout layer's output at each training forward).
_SCRIPT = """
import os, signal, sys
import torch
import nestedtrain as nt
import nestedtrain.methods.shared_prefix as shared_prefix
from nestedtrain.engine import checkpoint
from nestedtrain.engine.faults import TrainingInterrupted
from nestedtrain.engine.trainer import Trainer
from nestedtrain.errors import ConfigError

out, mode, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
rank = int(os.environ["RANK"])
hook = None
if mode == "probe" and rank == 1:  # only rank 1's probe says the shared path cannot run
    def cannot_split(*args, **kwargs):
        raise shared_prefix.SplitError("a stand-in that refuses on rank 1")
    shared_prefix.ModelSplit = cannot_split
if mode == "stop":
    def hook(epoch, step):
        if rank == 1 and (epoch, step) == (0, 3):
            os.kill(os.getpid(), signal.SIGUSR1)
if mode == "resume" and rank == 1:  # only rank 1 finds last.pt torn
    load = checkpoint.load_checkpoint
    def torn(path, *args, **kwargs):
        if os.path.basename(path) == "last.pt":
            raise ConfigError(f"cannot read checkpoint {str(path)!r}")
        return load(path, *args, **kwargs)
    checkpoint.load_checkpoint = torn
trainer = Trainer(nt.load_config(None, overrides), out, resume=mode == "resume")
masks = []
if mode == "dropout":
    drop = trainer.model.blocks[0].mlp.drop1
    drop.register_forward_hook(lambda m, i, o: masks.append(o == 0) if m.training else None)
try:
    trainer.fit(progress=False, step_hook=hook)
except TrainingInterrupted:
    pass
torch.save({"model": trainer.model.state_dict(), "masks": masks}, f"{out}/rank{rank}-{mode}.pt")
"""


def _torchrun(tmp_path: Path, out: Path, mode: str, overrides: list[str]) -> dict[int, dict]:
    """Run the script on 2 gloo ranks; each rank's saved model and masks."""
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
        + [str(script), str(out), mode, *overrides],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: a hang ends with every rank killed
    )
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"torchrun {mode}: the ranks hung (disagreeing collectives)")
    assert proc.returncode == 0, stderr[-3000:]
    ranks = {r: torch.load(out / f"rank{r}-{mode}.pt", weights_only=False) for r in (0, 1)}
    ranks["stderr"] = stderr
    return ranks


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, f"ranks differ in {unequal[:4]}"


@pytest.mark.slow
def test_ranks_agree_on_bn_statistics_and_evaluate_as_one_process(tmp_path):
    # The shared-prefix ST step runs DDP's forwards under no_sync: DDP never broadcasts the
    # buffers, and each rank's BN statistics follow its own images.
    out = tmp_path / "run"
    ranks = _torchrun(tmp_path, out, "plain", [*ST_RESNET, "epochs=2"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["st_shared_prefix"].startswith("on:")
    _assert_same_state(ranks[0]["model"], ranks[1]["model"])
    _assert_same_state(ranks[0]["model"], torch.load(out / "weights.pt"))
    # The 2-rank evaluation (each rank its half of the test split) is the saved weights' one.
    model, cfg, _ = load_model(out)
    data = build_data(cfg.data, batch_size=cfg.batch_size, seed=cfg.seed, device="cpu")
    alone = evaluate(model, data.eval_batches("test", batch_size=cfg.eval.batch_size))
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["test_acc"] == alone["acc"]
    assert last["test_loss"] == pytest.approx(alone["loss"], rel=1e-6)


@pytest.mark.slow
def test_ranks_take_one_st_path_when_their_probes_disagree(tmp_path):
    out = tmp_path / "run"
    ranks = _torchrun(tmp_path, out, "probe", [*ST_RESNET, "epochs=1"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["st_shared_prefix"] == "off: it does not apply on another rank"
    _assert_same_state(ranks[0]["model"], ranks[1]["model"])


@pytest.mark.slow
def test_ranks_resume_from_one_checkpoint_when_one_cannot_read_last(tmp_path):
    out = tmp_path / "run"
    overrides = [*ST_RESNET, "epochs=2", "checkpoint.every_steps=2", "eval.subnets=none"]
    _torchrun(tmp_path, out, "stop", overrides)
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    previous = torch.load(out / "checkpoints" / "last.prev.pt", weights_only=False)
    # stopped after step 4 (the agreed step after the signal), step checkpoint at step 2
    assert last["position"] != previous["position"] == {"epoch": 0, "step": 2}
    ranks = _torchrun(tmp_path, out, "resume", overrides)
    assert "last.prev.pt instead: another rank could not read it" in ranks["stderr"]
    _assert_same_state(ranks[0]["model"], ranks[1]["model"])
    epochs = [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]


@pytest.mark.slow
def test_each_rank_draws_its_own_dropout_masks(tmp_path):
    out = tmp_path / "run"
    overrides = [
        "method=ct",
        "model.name=vit_tiny_patch16_224",
        "model.kwargs={img_size: 8, patch_size: 4, depth: 1, proj_drop_rate: 0.5}",
        *SMALL,
        "epochs=1",
        "eval.subnets=none",
    ]
    ranks = _torchrun(tmp_path, out, "dropout", overrides)
    masks = [torch.stack(ranks[r]["masks"]) for r in (0, 1)]
    assert masks[0].shape == masks[1].shape and masks[0].shape[0] == 4  # a forward a step
    assert 0.4 < masks[0].float().mean() < 0.6  # the layer drops about half
    assert not torch.equal(masks[0], masks[1]), "both ranks drew the same masks"
    _assert_same_state(ranks[0]["model"], ranks[1]["model"])
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])


def test_ranks_agree_on_stop_every_few_steps_not_every_step(tmp_path, monkeypatch):
    """Under torchrun the stop and time flags take one all-reduce every _AGREE_EVERY steps
    and at the epoch's end; a signal stops at the next such step."""
    # 336 images in batches of 8: 42 steps
    cfg = nt.load_config(None, [*SMALL, "data.train_subset=336", "batch_size=8", "epochs=1"])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer._prepare_folder()
    group = object()  # stands for the gloo control group
    calls = []

    def all_reduce(tensor, op=None, group=None):
        calls.append(group)

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(
        torch.distributed, "all_gather_object", lambda out, obj, group=None: out.__setitem__(0, obj)
    )
    trainer.control.group = group
    trainer.train_epoch(0, progress=False)
    assert loop_module._AGREE_EVERY == 20
    assert len(calls) == 3 and all(g is group for g in calls)  # steps 20, 40 and 42

    class Signals:  # what the loop reads of StopSignals
        requested = None

    def request(epoch, step):
        if step == 23:
            Signals.requested = "SIGTERM"

    trainer.control.signals = Signals()
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.train_epoch(0, progress=False, step_hook=request)
    assert stopped.value.step == 40


def test_cuda_runs_let_cudnn_tune_and_use_tf32_and_cpu_runs_are_left_alone():
    from nestedtrain.engine.distributed import configure_cuda

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    try:
        cudnn.benchmark = cudnn.allow_tf32 = matmul.allow_tf32 = False
        configure_cuda(torch.device("cpu"))
        assert not (cudnn.benchmark or cudnn.allow_tf32 or matmul.allow_tf32)
        configure_cuda(torch.device("cuda", 0))  # sets flags only: no GPU needed
        assert cudnn.benchmark and cudnn.allow_tf32 and matmul.allow_tf32
    finally:
        cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved
