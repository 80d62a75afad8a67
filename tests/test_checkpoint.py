"""Checkpoints: written atomically, and a torn last checkpoint falls back to the previous one."""

from __future__ import annotations

import pytest
import torch
from test_faults import _assert_same_run, _cfg, _Kill, _kill_at

import nestedtrain as nt
from nestedtrain import atomic
from nestedtrain.engine import checkpoint as ckpt_module
from nestedtrain.engine.trainer import Trainer


def test_crash_between_temp_write_and_rename_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic.atomic_save({"format": ckpt_module.CHECKPOINT_FORMAT, "epoch": 1}, path)

    def crash(src, dst):
        raise OSError("disk pulled out")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="disk pulled out"):
        atomic.atomic_save({"format": ckpt_module.CHECKPOINT_FORMAT, "epoch": 2}, path)
    monkeypatch.undo()
    assert ckpt_module.load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_unreadable_last_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    overrides = ["method=ct", "epochs=2", "checkpoint.every_steps=2"]
    nt.train(_cfg(*overrides), tmp_path / "straight")
    with pytest.raises(_Kill):
        Trainer(_cfg(*overrides), tmp_path / "broken").fit(step_hook=_kill_at(1, 7))
    last = tmp_path / "broken" / "checkpoints" / "last.pt"
    previous = atomic.previous_path(last)
    assert torch.load(previous, weights_only=False)["position"] == {"epoch": 1, "step": 4}
    last.write_bytes(last.read_bytes()[:1000])  # a torn write on a flaky file system
    with caplog.at_level("WARNING", logger="nestedtrain"):
        nt.train(_cfg(*overrides), tmp_path / "broken", resume=True)
    notes = [r.getMessage() for r in caplog.records if "resuming from" in r.getMessage()]
    assert len(notes) == 1 and "last.prev.pt" in notes[0] and "\n" not in notes[0]
    _assert_same_run(tmp_path / "straight", tmp_path / "broken")
