"""The training epoch loop: when it checkpoints between steps, and how often it reads the device."""

from __future__ import annotations

import pytest
import torch
from test_faults import _cfg, _Kill, _kill_at

from nestedtrain.engine.trainer import Trainer


def test_time_based_checkpoints_only_when_due(tmp_path):
    # every_minutes=1e-9 is due after every step; the 30-minute default never within
    # the seconds these epochs take, so small runs checkpoint only at epoch ends.
    with pytest.raises(_Kill):
        Trainer(_cfg("epochs=1", "checkpoint.every_minutes=1e-9"), tmp_path / "often").fit(
            step_hook=_kill_at(0, 6)
        )
    state = torch.load(tmp_path / "often" / "checkpoints" / "last.pt", weights_only=False)
    assert state["position"] == {"epoch": 0, "step": 5}
    with pytest.raises(_Kill):
        Trainer(_cfg("epochs=1"), tmp_path / "default").fit(step_hook=_kill_at(0, 6))
    assert not (tmp_path / "default" / "checkpoints" / "last.pt").exists()


def test_training_loop_reads_the_device_only_at_log_points(tmp_path, monkeypatch):
    """The number of host reads of floating-point tensors does not grow with the steps."""
    reads = {"n": 0}
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__float__")}

    def counting(name):
        def read(self, *args, **kwargs):
            if self.is_floating_point():
                reads["n"] += 1
            return originals[name](self, *args, **kwargs)

        return read

    def reads_in_epoch(batch):
        trainer = Trainer(
            _cfg("method=st", f"batch_size={batch}", "log_every=1000", "eval.subnets=none"),
            tmp_path / f"run{batch}",
        )
        for name in originals:
            monkeypatch.setattr(torch.Tensor, name, counting(name))
        reads["n"] = 0
        trainer.train_epoch(0, progress=False)
        monkeypatch.undo()
        return reads["n"], trainer.data.steps_per_epoch

    few, steps_few = reads_in_epoch(64)
    many, steps_many = reads_in_epoch(16)
    assert steps_many == 4 * steps_few
    assert many == few, (few, many)
