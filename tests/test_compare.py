"""``nestedtrain compare`` (grouping, mean ± std, paired differences): the statistics on synthetic
run folders, checked by hand."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

from nestedtrain.analysis.compare import compare_runs, parse_baseline
from nestedtrain.cli import main
from nestedtrain.engine.sweep import SWEEP_FILE


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
