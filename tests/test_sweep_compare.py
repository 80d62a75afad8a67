"""``nestedtrain sweep`` (grids, resume, failure isolation) and ``compare`` (grouping, mean ±
std, paired differences) — the statistics on synthetic run folders, checked by hand."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

from nestedtrain.analysis.compare import compare_runs, parse_baseline
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


# ------------------------------------------------------------------------------ compare
def _fake_run(folder: Path, config: dict, summary: dict, accs: list[float]) -> Path:
    folder.mkdir(parents=True)
    full = {"method": "ct", "seed": 0, "epochs": 3, "model": {"name": "resnet20"}}
    full["data"] = {"name": "digits", "train_subset": None, "root": "data"}
    for key, value in config.items():
        node = full
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    (folder / "config.yaml").write_text("# nestedtrain: test\n" + yaml.safe_dump(full))
    base = {"main_acc": accs[-1], "best_epoch": 2, "wall_seconds": 10.0, "flops": 5e6}
    (folder / "summary.json").write_text(json.dumps({**base, **summary}))
    lines = [
        {"epoch": e, "test_acc": a, "images_per_second": 100.0 + e} for e, a in enumerate(accs)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def _sweep_of(root: Path, runs: dict[str, dict]) -> None:
    entries = {name: {"recipe": "r.yaml", "overrides": list(o)} for name, o in runs.items()}
    (root / SWEEP_FILE).write_text(json.dumps(entries))


def test_compare_means_stds_and_paired_differences_by_hand(tmp_path, capsys):
    root = tmp_path / "sweep"
    ct = {0: 90.0, 1: 92.0, 2: 91.0}
    st = {0: 91.0, 1: 95.0, 2: 91.5}
    sub_mean = {0: 80.0, 1: 84.0, 2: 83.0}
    names = {}
    for seed in ct:
        name = f"method=ct,seed={seed}"
        _fake_run(root / name, {"seed": seed}, {}, [50.0, 70.0, ct[seed]])
        names[name] = ["method=ct", f"seed={seed}"]
        name = f"method=st,seed={seed}"
        subnets = {
            "subnets": [
                {"subnet": "1-1-1", "acc": sub_mean[seed] - 1},
                {"subnet": "3-3-3", "acc": sub_mean[seed] + 1},
            ],
            "subnet_acc_mean": sub_mean[seed],
            "subnet_acc_min": sub_mean[seed] - 1,
        }
        _fake_run(root / name, {"method": "st", "seed": seed}, subnets, [55.0, 75.0, st[seed]])
        names[name] = ["method=st", f"seed={seed}"]
    _sweep_of(root, names)
    result = compare_runs([root], baseline=parse_baseline("method=ct"))
    assert result["by"] == ["method"]  # seed differs too, but is what is averaged over
    groups = {g["label"]["method"]: g for g in result["groups"]}
    assert groups["st"]["n"] == 3 and groups["st"]["seeds"] == [0, 1, 2]
    assert groups["st"]["main_acc"]["mean"] == pytest.approx(statistics.fmean(st.values()))
    assert groups["st"]["main_acc"]["std"] == pytest.approx(statistics.stdev(st.values()))
    diffs = [st[s] - ct[s] for s in ct]  # 1.0, 3.0, 0.5
    assert groups["st"]["paired_main_acc"]["mean"] == pytest.approx(statistics.fmean(diffs))
    assert groups["st"]["paired_main_acc"]["std"] == pytest.approx(statistics.stdev(diffs))
    assert groups["st"]["subnet_acc_min"] == 79.0
    assert groups["st"]["subnet_acc_mean"]["mean"] == pytest.approx(82.333333, rel=1e-6)
    assert "paired_main_acc" not in groups["ct"] and "subnet_acc_mean" not in groups["ct"]
    assert groups["ct"]["curve"]["mean"] == pytest.approx([50.0, 70.0, 91.0])
    assert groups["ct"]["images_per_second"]["mean"] == 101.0  # median of 100, 101, 102
    # through the CLI: the table, the Markdown and the plots
    assert main(["compare", str(root), "--baseline", "method=ct"]) == 0
    printed = capsys.readouterr().out
    assert "91.00 ± 1.00" in printed and "1.50 ± 1.32" in printed  # ct; st - ct
    markdown = (root / "compare" / "compare.md").read_text()
    assert "`nestedtrain compare" in markdown and "| st | 3 | 92.50 ± 2.18 |" in markdown
    for png in ("accuracy_per_epoch.png", "subnet_accuracy.png", "accuracy_vs_cost.png"):
        assert (root / "compare" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_on_the_validation_split_reads_no_test_number(tmp_path, capsys):
    """``--split val``: the main network's last validation accuracy, paired by seed; nothing
    measured on the test split (main, sub-networks) reaches the table or the JSON."""
    root = tmp_path / "sweep"
    val = {("ct", 0): 80.0, ("ct", 1): 82.0, ("st", 0): 81.0, ("st", 1): 86.0}
    names = {}
    for (method, seed), acc in val.items():
        name = f"method={method},seed={seed}"
        subnets = {"subnets": [{"subnet": "1-1-1", "acc": 11.0}], "subnet_acc_mean": 11.0}
        # test accuracies of 33.0 must appear nowhere
        run = _fake_run(root / name, {"method": method, "seed": seed}, subnets, [10.0, 33.0])
        if method == "ct" and seed == 1:  # a run from before summary.json held val_acc
            lines = [{"epoch": 0, "val_acc": 50.0}, {"epoch": 1, "val_acc": acc, "test_acc": 33.0}]
            (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        else:
            summary = json.loads((run / "summary.json").read_text())
            (run / "summary.json").write_text(json.dumps({**summary, "val_acc": acc}))
        names[name] = [f"method={method}", f"seed={seed}"]
    _sweep_of(root, names)
    result = compare_runs([root], baseline=parse_baseline("method=ct"), split="val")
    groups = {g["label"]["method"]: g for g in result["groups"]}
    assert groups["ct"]["main_acc"]["mean"] == pytest.approx(81.0)
    assert groups["st"]["paired_main_acc"]["mean"] == pytest.approx(2.5)  # 1.0 and 4.0
    assert "subnet_acc_mean" not in groups["st"] and "33.0" not in json.dumps(result)
    assert main(["compare", str(root), "--baseline", "method=ct", "--split", "val"]) == 0
    printed = capsys.readouterr().out
    assert "main val %" in printed and "83.50 ± 3.54" in printed and "subnets" not in printed
    assert main(["compare", str(root), "--split", "train"]) == 2
    assert "invalid choice: 'train'" in capsys.readouterr().err


def test_compare_motivation_efficiency_against_classical_groups(tmp_path):
    root = tmp_path / "sweep"
    names = {}
    for seed in (0, 1):
        for model, acc, flops in (("resnet20", 90.0, 40e6), ("resnet32", 92.0, 70e6)):
            name = f"seed={seed},method=ct,model.name={model}"
            _fake_run(
                root / name,
                {"seed": seed, "model.name": model},
                {"flops": flops},
                [acc + seed],
            )
            names[name] = [f"seed={seed}", "method=ct", f"model.name={model}"]
        name = f"seed={seed},method=motivation"
        summary = {"base_acc": 91.0 + seed, "motivated_acc": 91.5, "flops_per_image": 50e6}
        config = {"seed": seed, "method": "motivation", "motivation.model": "resnet32"}
        _fake_run(root / name, config, summary, [91.0 + seed])
        names[name] = [f"seed={seed}", "method=motivation"]
    _sweep_of(root, names)
    result = compare_runs([root])
    assert result["by"] == ["method", "model.name"]
    motivation = next(g for g in result["groups"] if g["label"]["method"] == "motivation")
    eff = motivation["efficiency"]
    # X-C: 90.5 at 40 MFLOPs, Y-C: 92.5 at 70, X-Y-B: 91.5 at 50
    assert eff["acc_flops_xyb"] == pytest.approx((91.5 - 90.5) / 10e6)
    assert eff["acc_flops_yc"] == pytest.approx((92.5 - 90.5) / 30e6)
    assert eff["ratio"] == pytest.approx(1.5)


def test_compare_refuses_mixed_data_and_bad_baselines(tmp_path, capsys):
    root = tmp_path / "runs"
    _fake_run(root / "a", {"seed": 0}, {}, [90.0])
    _fake_run(root / "b", {"seed": 1, "epochs": 5}, {}, [91.0])
    assert main(["compare", str(root), "--by", "method"]) == 2
    assert "group method=ct mixes runs with different epochs (3, 5)" in capsys.readouterr().err
    assert main(["compare", str(root), "--baseline", "method=st"]) == 2
    assert "--baseline method=st matches no group" in capsys.readouterr().err
    assert main(["compare", str(root), "--by", "nope"]) == 2
    assert "--by nope: no such recipe field" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "missing")]) == 2


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


def test_compare_shows_training_cost_relative_to_the_baseline(tmp_path, capsys):
    """Cost = epochs ÷ median images/s: a group at half the throughput and twice the epochs
    costs 4× the baseline; another data size gets no ratio."""
    root = tmp_path / "runs"
    ct = _fake_run(root / "ct", {}, {}, [50.0, 60.0, 70.0])  # 3 epochs at 101 images/s
    slow = _fake_run(root / "slow", {"method": "st", "epochs": 6}, {}, [60.0] * 6)
    lines = [{"epoch": e, "test_acc": 60.0, "images_per_second": 50.5} for e in range(6)]
    (slow / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    other = {"method": "stpp", "data.train_subset": 100}
    _fake_run(root / "other", other, {}, [40.0, 50.0, 60.0])
    result = compare_runs([ct, slow, root / "other"], baseline=parse_baseline("method=ct"))
    costs = {g["label"]["method"]: g["relative_cost"] for g in result["groups"]}
    assert costs["ct"] == 1.0 and costs["st"] == pytest.approx(4.0) and costs["stpp"] is None
    assert main(["compare", str(ct), str(slow), "--baseline", "method=ct"]) == 0
    printed = capsys.readouterr().out
    assert "cost × baseline" in printed and "4.00" in printed
