"""What ranks must agree on under torchrun (2 gloo processes on the CPU): BN statistics,
the ST step's path, the checkpoint to resume from, when to stop; and what they must not
share: dropout masks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import nestedtrain as nt
from nestedtrain.data import build_data
from nestedtrain.engine import loop as loop_module
from nestedtrain.engine.build import load_model
from nestedtrain.engine.trainer import Trainer
from nestedtrain.errors import TrainingInterrupted
from nestedtrain.evaluation import evaluate

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
from nestedtrain.errors import TrainingInterrupted
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
unused = getattr(trainer.method.model, "find_unused_parameters", None)  # DDP's setting
state = {"model": trainer.model.state_dict(), "masks": masks, "find_unused": unused}
torch.save(state, f"{out}/rank{rank}-{mode}.pt")
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
    # the shared path all-reduces by hand: DDP need not look for unused parameters
    assert ranks[0]["find_unused"] is ranks[1]["find_unused"] is False
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
    # the plain path's last sub-network backward is DDP's, with skipped blocks
    assert ranks[0]["find_unused"] is ranks[1]["find_unused"] is True
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
    """Under torchrun the stop and time flags (and whether a rank met bad images) take one
    all-reduce every _AGREE_EVERY steps and at the epoch's end; a signal stops at the next
    such step."""
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
    # stop/save at steps 20, 40 and 42, and the loss's finiteness at the epoch's end
    assert len(calls) == 4 and all(g is group for g in calls)

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
    from nestedtrain.distributed import configure_cuda

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


# ------------------------------------------------------------- a rank that fails alone
# argv: mode, then `nestedtrain train`'s arguments. Mode "nan": rank 1's third step sees NaN
# images, so only its loss is non-finite there.
_CLI = """
import os, sys
from nestedtrain.cli import main
from nestedtrain.engine.trainer import Trainer

if sys.argv[1] == "nan" and os.environ["RANK"] == "1":
    build = Trainer._build

    def poisoned_build(self, cfg):
        build(self, cfg)
        step, count = self.method.step, [0]

        def poisoned(images, labels):
            count[0] += 1
            return step(images * float("nan") if count[0] == 3 else images, labels)

        self.method.step = poisoned

    Trainer._build = poisoned_build
sys.exit(main(sys.argv[2:]))
"""


def _two_ranks(tmp_path: Path, mode: str, args: list[str]) -> list[tuple[int, str, float]]:
    """``nestedtrain train ARGS`` as ranks 0 and 1 of a gloo group (the environment torchrun
    gives each rank, set by hand so that each rank's status and stderr can be read);
    ``(status, stderr, exit time)`` of each."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    env.update(MASTER_PORT=str(port), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CLI, mode, "train", *args],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / f"stderr{r}", "w"),  # noqa: SIM115 - closed with the process
            start_new_session=True,
        )
        for r in (0, 1)
    ]
    ended: dict[int, float] = {}
    deadline = time.monotonic() + 180
    while len(ended) < 2 and time.monotonic() < deadline:
        for r, proc in enumerate(procs):
            if r not in ended and proc.poll() is not None:
                ended[r] = time.monotonic()
        time.sleep(0.1)
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert len(ended) == 2, f"{mode}: rank(s) {sorted({0, 1} - set(ended))} hung"
    return [(procs[r].returncode, (tmp_path / f"stderr{r}").read_text(), ended[r]) for r in (0, 1)]


def _assert_stop_alike(ranks: list[tuple[int, str, float]], status: int, text: str) -> None:
    """Both ranks exit with ``status`` within seconds of each other, each with the same one
    line containing ``text`` and no traceback."""
    (status0, err0, end0), (status1, err1, end1) = ranks
    assert "Traceback" not in err0 + err1, (err0 + err1)[-3000:]
    assert (status0, status1) == (status, status), (err0 + err1)[-3000:]
    lines = [[x for x in err.splitlines() if text in x] for err in (err0, err1)]
    assert len(lines[0]) == len(lines[1]) == 1 and lines[0] == lines[1], lines
    assert abs(end0 - end1) < 5


def _folder_with_shards(root: Path) -> dict[int, list[Path]]:
    """An image folder (2 classes of 16 train and 4 test images) and, per rank, the files
    that rank reads in epoch 0 of a 2-rank run with global batches of 8 (4 steps)."""
    from test_data import write_image_tree

    from nestedtrain.data.partition import Sharding

    write_image_tree(root, {"train": 16, "val": 4}, size=12)
    files = sorted((root / "train").glob("*/*.png"))  # ImageFolder's order
    shards = {}
    for rank in (0, 1):
        steps = Sharding(len(files), 8, rank, 2, seed=0).rank_batches(0)
        shards[rank] = [files[i] for index in steps for i in index.tolist()]
    return shards


def _truncate(path: Path) -> str:
    path.write_bytes(path.read_bytes()[:40])
    return str(path)


FOLDER_RUN = [
    str(Path(__file__).resolve().parents[1] / "recipes" / "digits_ct.yaml"),
    "data.name=imagefolder",
    "data.img_size=8",
    "data.val_size=0",
    "data.num_workers=1",
    "model.name=resnet20",
    "batch_size=8",
    "epochs=1",
    "seed=0",
    "eval.subnets=none",
]


@pytest.mark.slow
def test_a_bad_image_on_one_rank_stops_every_rank_alike(tmp_path):
    shards = _folder_with_shards(tmp_path / "images")
    bad = _truncate(shards[1][5])  # step 2 of rank 1 only
    args = [*FOLDER_RUN, f"data.root={tmp_path / 'images'}", "data.bad_images=error"]
    ranks = _two_ranks(tmp_path, "plain", [*args, "--out", str(tmp_path / "run")])
    _assert_stop_alike(ranks, 2, f"nestedtrain: error: image {bad!r} does not decode")
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


@pytest.mark.slow
def test_the_bad_image_fraction_is_judged_on_all_ranks_together(tmp_path):
    shards = _folder_with_shards(tmp_path / "images")
    _truncate(shards[0][2])
    bad = _truncate(shards[1][6])  # rank 1's is in summary.json, not only rank 0's
    # 40 images: a fraction of 0.03 allows 1 bad file, so each rank alone is within it
    args = [*FOLDER_RUN, f"data.root={tmp_path / 'images'}"]
    ranks = _two_ranks(
        tmp_path, "plain", [*args, "data.max_bad_fraction=0.03", "--out", str(tmp_path / "run")]
    )
    _assert_stop_alike(ranks, 2, "2 of the 40 images")
    ranks = _two_ranks(
        tmp_path, "plain", [*args, "data.max_bad_fraction=0.05", "--out", str(tmp_path / "run2")]
    )
    assert [status for status, _, _ in ranks] == [0, 0], ranks[0][1][-2000:]
    summary = json.loads((tmp_path / "run2" / "summary.json").read_text())
    assert summary["bad_images"] == 2 and bad in summary["bad_image_paths"]


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_stops_every_rank_alike(tmp_path):
    args = [FOLDER_RUN[0], *SMALL, "model.name=resnet20", "epochs=2", "log_every=4"]
    ranks = _two_ranks(tmp_path, "nan", ["--out", str(tmp_path / "run"), *args])
    # rank 1's step 3; rank 0's loss goes bad a step later, through the averaged gradients
    _assert_stop_alike(ranks, 3, "loss term 'ce' is nan at step 3 of epoch 1")
