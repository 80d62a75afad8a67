"""``nestedtrain sweep``: grids, resume, failure isolation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nestedtrain.cli import main
from nestedtrain.engine.config import load_config, to_yaml
from nestedtrain.engine.sweep import SWEEP_FILE, expand_grid, plan_sweep
from nestedtrain.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "digits_ct.yaml")
TINY = ["model.name=resnet20", "epochs=1", "eval.subnets=none"]


# ------------------------------------------------------------------------------ the grid
def test_grid_is_the_cross_product_named_by_its_overrides():
    runs = expand_grid(["method=ct,st", "seed=0,1,2", "epochs=3"])
    assert len(runs) == 6
    assert runs[0].name == "method=ct,seed=0,epochs=3"
    assert runs[-1].name == "method=st,seed=2,epochs=3"
    assert runs[4].overrides == ("method=st", "seed=1", "epochs=3")
    # a run keeps its name when the sweep grows
    assert expand_grid(["method=ct", "seed=0", "epochs=3"])[0].name == runs[0].name
    assert [r.name for r in expand_grid([])] == ["default"]
    assert expand_grid(["data.root=/x/y z"])[0].name == "data.root=_x_y_z"


def test_grid_keeps_bracketed_and_escaped_commas():
    runs = expand_grid(["st.resize=[0.43,1.0],[0.5,1.0]", r"eval.subnets=3-3-3\,1-1-1,all"])
    assert [r.overrides for r in runs][0] == ("st.resize=[0.43,1.0]", "eval.subnets=3-3-3,1-1-1")
    assert len(runs) == 4 and len({r.name for r in runs}) == 4


def test_plus_adds_grids_sharing_what_comes_first():
    runs = expand_grid(
        ["seed=0,1", "+", "method=motivation", "+", "method=ct", "model.name=resnet20,resnet32"]
    )
    assert [r.overrides for r in runs] == [
        ("seed=0", "method=motivation"),
        ("seed=1", "method=motivation"),
        ("seed=0", "method=ct", "model.name=resnet20"),
        ("seed=0", "method=ct", "model.name=resnet32"),
        ("seed=1", "method=ct", "model.name=resnet20"),
        ("seed=1", "method=ct", "model.name=resnet32"),
    ]
    assert runs[2].name == "seed=0,method=ct,model.name=resnet20"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["seed"], "must be key=value"),
        (["seed=0,,1"], "empty value"),
        (["seed=0,0"], "lists a value twice"),
        (["seed=0", "seed=1"], "given twice"),
        (["seed=0", "+"], "followed by overrides"),
        (["seed=0", "+", "epochs=1", "+", "epochs=1"], "same run twice"),
    ],
)
def test_bad_grids(overrides, message):
    with pytest.raises(ValueError, match=message):
        expand_grid(overrides)


# ----------------------------------------------------------------------------- the sweep
def test_sweep_isolates_failures_skips_finished_runs_and_resumes(tmp_path, capsys):
    out = tmp_path / "sweep"
    # 100000 training images do not exist: that run fails, the other one trains
    args = ["sweep", RECIPE, "data.train_subset=128,100000", *TINY, "--out", str(out)]
    assert main(args) == 1
    printed = capsys.readouterr().out
    tail = ",model.name=resnet20,epochs=1,eval.subnets=none"
    good, bad = f"data.train_subset=128{tail}", f"data.train_subset=100000{tail}"
    assert "1 trained, 0 finished before, 1 failed" in printed
    assert f"failed {bad}: nestedtrain: error: data.train_subset=100000 is more" in printed
    assert (out / good / "summary.json").is_file()
    assert (
        json.loads((out / SWEEP_FILE).read_text())[good]["overrides"][0] == "data.train_subset=128"
    )
    # the same command again: the finished run is skipped, the failed one tried again
    assert main(args) == 1
    printed = capsys.readouterr().out
    assert f"{good}: finished before, skipped" in printed and "1 failed" in printed
    # a run stopped after its last checkpoint but before its summary is resumed
    (out / good / "summary.json").unlink()
    weights = (out / good / "weights.pt").read_bytes()
    assert main(["sweep", RECIPE, "data.train_subset=128", *TINY, "--out", str(out)]) == 0
    assert f"{good}: resumed" in capsys.readouterr().out
    assert (out / good / "summary.json").is_file()
    assert (out / good / "weights.pt").read_bytes() == weights


def test_sweep_print_refuses_other_settings_and_too_many_jobs(tmp_path, capsys):
    out = tmp_path / "sweep"
    small = [*TINY, "data.train_subset=128"]
    assert main(["sweep", RECIPE, *small, "seed=0,1", "--out", str(out), "--print"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and not out.exists()
    assert lines[1].startswith("nestedtrain train ") and lines[1].endswith(",seed=1")
    # same folder name, but the recipe changed since: refused before anything runs
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(Path(RECIPE).read_text().replace("epochs: 20", "epochs: 7"))
    assert main(["sweep", str(recipe), *small, "seed=0", "--out", str(out)]) == 0
    recipe.write_text(recipe.read_text().replace("lr: 0.1", "lr: 0.2"))
    assert main(["sweep", str(recipe), *small, "seed=0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a run of other settings (optim.lr=0.1 there, 0.2 here)" in err
    assert main(["sweep", RECIPE, "seed=0", "--out", str(out), "--jobs", "64"]) == 2
    assert "--jobs 64: give 1 to" in capsys.readouterr().err
    assert main(["sweep", RECIPE, "seed=0", "no_such.field=1", "--out", str(out)]) == 2


def test_sweep_resumes_a_run_whose_config_predates_a_new_field(tmp_path):
    """A recipe field added after a run was made reads as its default there, so the same sweep
    command continues after an upgrade; a real difference is still refused."""
    [run] = expand_grid(["seed=0", *TINY])
    folder = tmp_path / run.name
    folder.mkdir()
    text = to_yaml(load_config(RECIPE, list(run.overrides)))
    assert "  pca_lighting: 0.0\n" in text
    (folder / "config.yaml").write_text(text.replace("  pca_lighting: 0.0\n", ""))
    assert plan_sweep(RECIPE, [run], tmp_path) == [(run, "restart")]
    (folder / "config.yaml").write_text(text.replace("lr: 0.1", "lr: 0.2"))
    with pytest.raises(ConfigError, match=r"optim.lr=0.2 there, 0.1 here"):
        plan_sweep(RECIPE, [run], tmp_path)
