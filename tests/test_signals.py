"""A stop signal at any moment of ``nestedtrain train``: start-up, steps, evaluation, summary,
teardown. Before training it ends the command with status 75 and nothing written; in training
with 75 and a checkpoint; after the last epoch it changes nothing. The README's rule (--resume
when checkpoints/last.pt exists, else a plain start) then ends bit-identical to a run never
stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_faults import _assert_same_run, _write_jpeg_tree

import nestedtrain.cli as cli
from nestedtrain.cli import train as cli_train
from nestedtrain.engine import trainer as trainer_module
from nestedtrain.engine.trainer import Trainer
from nestedtrain.errors import EXIT_INTERRUPTED

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "digits_ct.yaml")
# digits, 256 training images in batches of 32: 8 steps an epoch; epoch 0 is evaluated
OVERRIDES = [
    "data.train_subset=256",
    "batch_size=32",
    "optim.lr=0.05",
    "model.name=resnet20",
    "method=st",
    "epochs=2",
    "eval.subnets=none",
    "eval.every=1",
]


# pytest's own handlers, read as the module is collected (before any test or fixture runs).
_PYTEST_HANDLERS = {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}


def _put_back_handlers() -> None:
    """``entry`` handles the signals for the rest of the process (and ignores SIGTERM and
    SIGUSR1 once done): put pytest's handlers back, so that later tests see the defaults."""
    for number, handler in _PYTEST_HANDLERS.items():
        signal.signal(number, handler)


@pytest.fixture(autouse=True)
def _restore_handlers():
    yield
    _put_back_handlers()


def _entry(*args: str) -> int:
    """``nestedtrain ARGS`` as the console script runs it, in this process; its exit status."""
    argv = sys.argv
    sys.argv = ["nestedtrain", *args]
    try:
        cli.entry()
    except SystemExit as done:
        return done.code
    finally:
        sys.argv = argv
    raise AssertionError("entry() returned without sys.exit")


def _train(out: Path, *extra: str) -> int:
    return _entry("train", RECIPE, *OVERRIDES, *extra, "--out", str(out))


def _readme_rule(out: Path) -> int:
    """The job script's rule: --resume when last.pt exists, else a plain start."""
    resume = ["--resume"] if (out / "checkpoints" / "last.pt").exists() else []
    return _train(out, *resume)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    assert _train(out) == 0
    _put_back_handlers()
    return out


def _send(name: str) -> None:
    os.kill(os.getpid(), getattr(signal, name))


def _signal_in(monkeypatch, owner, attribute: str, name: str, call: int = 1) -> None:
    """Send ``name`` to this process as ``owner.attribute`` is called for the ``call``-th time."""
    original = getattr(owner, attribute)
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            _send(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attribute, wrapped)


# (where the signal arrives, what the command ends with, what it leaves)
START_UP = {  # before anything is written: 75, no run folder
    "data": (trainer_module, "build_data"),
    "model": (trainer_module, "build_run_model"),
}
TRAINING = {  # 75 and a checkpoint to resume from (and "step": a step hook, below)
    "folder": (Trainer, "_prepare_folder", 1),  # deferred already: stops after the first step
    "evaluation": (Trainer, "evaluate_epoch", 1),  # epoch 0's
}
DONE = {  # after the last epoch: exit 0, the run is whole
    "final evaluation": (Trainer, "evaluate_epoch", 2),
    "summary": (Trainer, "_finish", 1),
    "teardown": (cli_train, "_print_summary", 1),
}


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
@pytest.mark.parametrize("moment", sorted(START_UP))
def test_signal_during_start_up_exits_75_and_writes_nothing(
    tmp_path, monkeypatch, capsys, straight, moment, name
):
    owner, attribute = START_UP[moment]
    _signal_in(monkeypatch, owner, attribute, name)
    out = tmp_path / "run"
    assert _train(out) == EXIT_INTERRUPTED
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{name} during start-up" in err, err
    assert not out.exists()
    monkeypatch.undo()
    assert _readme_rule(out) == 0
    _assert_same_run(straight, out)


def test_ctrl_c_during_start_up_is_130_and_writes_nothing(tmp_path, monkeypatch, capsys):
    _signal_in(monkeypatch, trainer_module, "build_data", "SIGINT")
    assert _train(tmp_path / "run") == 130
    assert capsys.readouterr().err.strip() == "nestedtrain: interrupted"
    assert not (tmp_path / "run").exists()


def _step_hook_signal(monkeypatch, name: str, at: tuple[int, int]) -> None:
    fit = Trainer.fit

    def hook(epoch: int, step: int) -> None:
        if (epoch, step) == at:
            _send(name)

    monkeypatch.setattr(Trainer, "fit", lambda self, progress=None: fit(self, progress, hook))


@pytest.mark.parametrize(
    "moment, name", [("folder", "SIGTERM"), ("step", "SIGUSR1"), ("evaluation", "SIGTERM")]
)
def test_signal_in_training_exits_75_and_the_readme_rule_ends_bit_identical(
    tmp_path, monkeypatch, capsys, straight, moment, name
):
    if moment == "step":
        _step_hook_signal(monkeypatch, name, (1, 3))
    else:
        _signal_in(monkeypatch, *TRAINING[moment][:2], name, call=TRAINING[moment][2])
    out = tmp_path / "run"
    assert _train(out) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert f"{name}: stopped after step" in err
    position = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["position"]
    expected = {"folder": (0, 1), "step": (1, 3), "evaluation": (1, 0)}[moment]
    assert (position["epoch"], position["step"]) == expected
    monkeypatch.undo()
    assert _readme_rule(out) == 0
    _assert_same_run(straight, out)


@pytest.mark.parametrize("moment", sorted(DONE))
def test_signal_after_the_last_epoch_changes_nothing(tmp_path, monkeypatch, straight, moment):
    owner, attribute, call = DONE[moment]
    _signal_in(monkeypatch, owner, attribute, "SIGTERM", call=call)
    out = tmp_path / "run"
    assert _train(out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2
    _assert_same_run(straight, out)
    # through teardown, where the interpreter drops Python handlers, the signals are ignored
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
    _send("SIGTERM")


class _Kill(BaseException):
    """Stands for SIGKILL after a scheduler's grace period: nothing else runs."""


@pytest.mark.parametrize("where", ["first step", "epoch log"])
def test_plain_start_takes_over_a_start_killed_before_its_first_checkpoint(
    tmp_path, monkeypatch, straight, where
):
    out = tmp_path / "run"
    if where == "first step":
        _step_hook_signal(monkeypatch, "SIGTERM", (0, 1))
        monkeypatch.setattr(Trainer, "_save_progress", lambda self, state: _raise(_Kill()))
    else:  # killed between epoch 0's log line and its checkpoint
        monkeypatch.setattr(Trainer, "_save", lambda self, epoch, best: _raise(_Kill()))
    with pytest.raises(_Kill):
        _train(out)
    assert (out / "config.yaml").exists() and not (out / "checkpoints" / "last.pt").exists()
    if where == "epoch log":
        assert (out / "metrics.jsonl").read_text().count("\n") == 1
    monkeypatch.undo()
    assert _readme_rule(out) == 0  # a plain start: not "already holds a run"
    _assert_same_run(straight, out)


def _raise(err: BaseException):
    raise err


def test_the_command_line_handles_signals_before_torch_loads(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = "import sys, nestedtrain.cli; print(sorted(m for m in sys.modules if m == 'torch'))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert loaded.stdout.strip() == "[]", loaded.stderr
    # SIGTERM while torch is being imported: exit 75, one line, nothing written
    driver = (
        "import builtins, os, signal, sys\n"
        "real = builtins.__import__\n"
        "def hooked(name, *args, **kwargs):\n"
        "    if name == 'torch' and not hasattr(builtins, '_sent'):\n"
        "        builtins._sent = True\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(name, *args, **kwargs)\n"
        "from nestedtrain.cli import entry\n"
        "builtins.__import__ = hooked\n"
        "sys.argv = ['nestedtrain', *sys.argv[1:]]\n"
        "entry()\n"
    )
    out = tmp_path / "run"
    args = ["train", RECIPE, *OVERRIDES, "--out", str(out)]
    stopped = subprocess.run(
        [sys.executable, "-c", driver, *args], capture_output=True, text=True, env=env
    )
    assert stopped.returncode == EXIT_INTERRUPTED, stopped.stderr
    assert stopped.stderr.strip().count("\n") == 0 and "SIGTERM" in stopped.stderr
    assert not out.exists()


_GROUP_DRIVER = """
import os, signal, sys
from nestedtrain.cli import entry
from nestedtrain.engine.trainer import Trainer

fit = Trainer.fit

def hook(epoch, step):
    if (epoch, step) == (0, 3):  # as a scheduler does: every process of the job
        os.killpg(os.getpgid(0), signal.SIGTERM)

Trainer.fit = lambda self, progress=None: fit(self, progress, hook)
sys.argv = ["nestedtrain", *sys.argv[1:]]
entry()
"""


def test_sigterm_to_the_whole_process_group_with_loader_workers(tmp_path, one_thread):
    # DataLoader workers get the scheduler's SIGTERM too; torch's die of it, and a dead worker
    # would end the main process mid-step with a traceback instead of a checkpoint and 75.
    # (One thread here as in the subprocess: the runs are compared bit for bit.)
    root = _write_jpeg_tree(tmp_path / "images", classes=3, per_class=12)
    folder = ["data.name=imagefolder", f"data.root={root}", "data.img_size=24"]
    folder += ["data.num_workers=2", "data.val_size=0", "data.train_subset=null", "batch_size=6"]
    args = ["train", RECIPE, *OVERRIDES, *folder, "data.calib_images=8"]
    assert _entry(*args, "--out", str(tmp_path / "straight")) == 0
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stopped = subprocess.run(
        [sys.executable, "-c", _GROUP_DRIVER, *args, "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        start_new_session=True,
        timeout=300,
    )
    assert stopped.returncode == EXIT_INTERRUPTED, stopped.stderr
    assert "SIGTERM: stopped after step 3 of epoch 1" in stopped.stderr
    assert _entry(*args, "--resume", "--out", str(out)) == 0
    _assert_same_run(tmp_path / "straight", out)
