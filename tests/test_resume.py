"""``--resume`` compares the recipe with the run's config.yaml: a change to what the run computes
is refused in one line unless ``--allow-changes`` (then recorded); other changes are noted."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from nestedtrain.cli import main

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "digits_ct.yaml")
SMALL = ["model.name=resnet20", "eval.subnets=none", "data.train_subset=256", "batch_size=32"]


def _train(out: Path, *args: str) -> int:
    return main(["train", RECIPE, *SMALL, *args, "--out", str(out)])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


@pytest.fixture
def run(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "epochs=1") == 0
    capsys.readouterr()
    return out


def test_a_change_to_the_computation_is_refused_in_one_line(run, capsys):
    before = (run / "config.yaml").read_text()
    assert _train(run, "epochs=2", "optim.lr=0.05", "--resume") == 2
    err = _one_line(capsys)
    assert "epochs 1 → 2" in err and "optim.lr 0.1 → 0.05" in err and "--allow-changes" in err
    assert (run / "config.yaml").read_text() == before
    assert not (run / "resume_changes.jsonl").exists()
    # a checkpoint does not load into another model, whatever is allowed
    for extra in ([], ["--allow-changes"]):
        assert _train(run, "epochs=1", "model.name=resnet32", "--resume", *extra) == 2
        err = _one_line(capsys)
        assert "model.name 'resnet20' → 'resnet32'" in err and "another --out" in err
    assert _train(run, "epochs=2", "--allow-changes") == 2
    assert "--allow-changes goes with --resume" in _one_line(capsys)


def test_changes_that_do_not_alter_the_run_are_noted(run, caplog):
    extra = ["eval.subnets=all", "log_every=5", "data.num_workers=0", "checkpoint.every_steps=3"]
    with caplog.at_level(logging.WARNING, logger="nestedtrain"):
        assert (
            main(["train", RECIPE, *SMALL, "epochs=1", *extra, "--resume", "--out", str(run)]) == 0
        )
    # the note names each change, on one line
    notes = [r.getMessage() for r in caplog.records if "resuming with" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0]
    assert "eval.subnets 'none' → 'all'" in notes[0] and "log_every 50 → 5" in notes[0]
    changes = [json.loads(x) for x in (run / "resume_changes.jsonl").read_text().splitlines()]
    assert changes[0]["computed"] == {} and changes[0]["neutral"]["log_every"] == [50, 5]


def test_allowed_changes_are_recorded_and_become_the_recipe(run, capsys):
    header = [x for x in (run / "config.yaml").read_text().splitlines() if x.startswith("#")]
    assert _train(run, "epochs=2", "--resume", "--allow-changes") == 0
    changes = [json.loads(x) for x in (run / "resume_changes.jsonl").read_text().splitlines()]
    assert changes == [{"time": changes[0]["time"], "computed": {"epochs": [1, 2]}, "neutral": {}}]
    text = (run / "config.yaml").read_text()
    assert [x for x in text.splitlines() if x.startswith("#")] == header
    assert yaml.safe_load(text)["epochs"] == 2
    epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]
    # the next resume compares with the recipe it now holds
    capsys.readouterr()
    assert _train(run, "epochs=2", "--resume") == 0
    assert _train(run, "epochs=1", "--resume") == 2
    assert "epochs 2 → 1" in _one_line(capsys)
