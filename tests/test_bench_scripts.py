"""The prepared benchmark scripts run end to end on the CPU at tiny sizes, so that a lent GPU's
few minutes are not spent finding a broken script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from nestedtrain.data.datasets import FASHION_MNIST_SYSTEM_DIR

REPO = Path(__file__).resolve().parents[1]
# one thread; PYTHONPATH kept, so that a checkout on it is the code the scripts run
_ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
_ENV.update({k: v for k, v in os.environ.items() if k == "PYTHONPATH"})


def _run_script(name: str, args: list[str]) -> str:
    """``bench/NAME ARGS`` in a fresh process on one thread; it must exit 0. Its stdout."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / name), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=_ENV,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(
    not FASHION_MNIST_SYSTEM_DIR.is_dir(), reason="needs the Debian package dataset-fashion-mnist"
)
def test_gpu_study_runs_its_three_recipes_concurrently_and_compares(tmp_path):
    """It reads Fashion-MNIST from the path given (here a missing folder: the Debian
    package's files are the fallback)."""
    out, doc = tmp_path / "study", tmp_path / "gpu_study.md"
    args = ["--device", "cpu", "--model", "resnet20", "--train", "256", "--epochs", "1"]
    args += ["--seeds", "1", "--subnets", "none", "--data-root", str(tmp_path / "data")]
    args += ["--set", "data.val_size=0.02", "--out", str(out), "--doc", str(doc)]
    stdout = _run_script("gpu_study.py", args)
    # its time estimate first, then how many processes share the device
    estimate, processes = stdout.splitlines()[:2]
    assert estimate.startswith("Estimated time: ")
    assert processes.startswith("3 training processes share")  # one seed per recipe
    text = doc.read_text()
    assert "(3 processes at once)" in text
    # the three methods, each recipe's own settings, on both splits, with the commands
    for method in ("ct", "st", "stpp"):
        (run,) = (out / f"fmnist_{method}").glob("seed=0,*")
        assert (run / "summary.json").is_file()
    assert "nestedtrain sweep recipes/fmnist_stpp.yaml seed=0 model.name=resnet20" in text
    assert "main val %" in text and "main %" in text and "--split val" in text
    assert text.count("baseline") >= 2 and "stpp" in text


def test_gpu_study_needs_the_data_path_and_stops_over_its_budget(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_study.py"), "--device", "cpu"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "--data-root" in done.stderr
    args = ["--device", "cpu", "--model", "resnet20", "--train", "256", "--epochs", "50"]
    args += ["--seeds", "1", "--data-root", str(tmp_path), "--out", str(tmp_path / "study")]
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_study.py"), *args, "--budget-minutes", "0.01"],
        capture_output=True,
        text=True,
        env=_ENV,
    )
    assert done.returncode == 1 and "over --budget-minutes 0.01: try --epochs" in done.stderr
    assert not (tmp_path / "study").exists()  # nothing trained


def test_gpu_check_times_every_method_and_the_data_path_and_writes_its_doc(tmp_path):
    doc = tmp_path / "gpu_check.md"
    args = ["--device", "cpu", "--model", "resnet18", "--img-size", "64", "--batch-size", "8"]
    args += ["--seconds", "0.3", "--warmup", "1", "--images", "40", "--workers", "2"]
    stdout = _run_script("gpu_check.py", [*args, "--doc", str(doc)])
    # its time estimate first, then the machine
    estimate, machine = stdout.splitlines()[:2]
    assert estimate.startswith("Estimated time: ") and estimate.endswith(" minutes")
    assert machine.startswith("Machine: cpu") and "2 loader workers" in machine
    text = doc.read_text()
    assert machine in text
    assert "python bench/gpu_check.py --device cpu --model resnet18" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "images/s" not in line]
    names = (
        "plain PyTorch loop",
        "nestedtrain CT",
        "ST (1",
        "ST++",
        "torchvision reference",
        "decoder=pil (",
        "decoder=torchvision (",
        "host half",
        "fed by its loader, decoder=pil",
        "fed by its loader, decoder=torchvision",
    )
    try:
        import nvidia.dali  # noqa: F401

        names += ("decoder=dali (", "fed by its loader, decoder=dali")
    except ImportError:
        assert "decoder=dali: data.decoder='dali': NVIDIA DALI is not installed" in text
    for name in names:
        (row,) = [r for r in rows if name in r and not (name == "nestedtrain CT" and "fed" in r)]
        assert float(row.split("|")[2]) > 0  # a measured rate
    assert "NCCL needs one per rank" in text


def _results_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("results", REPO / "bench" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_quick_mode_says_whether_main_gives_the_recorded_check_row(
    tmp_path, monkeypatch, capsys
):
    results = _results_module()
    record = {"main_acc": 80.5, "loss": 0.51, "machine": "x86_64", "threads": 1, "torch": "2"}
    doc = tmp_path / "RESULTS.md"
    doc.write_text(
        f"# Results\n\n{results.RECORD_START} {json.dumps(record)} {results.RECORD_END}\n"
    )
    monkeypatch.setattr(results, "run_check", lambda folder: dict(record))
    assert results.quick(doc) == 0
    assert "same: main still gives" in capsys.readouterr().out
    monkeypatch.setattr(results, "run_check", lambda folder: {**record, "loss": 0.5100001})
    assert results.quick(doc) == 1
    assert "DIFFERS" in capsys.readouterr().out
    assert results.quick(tmp_path / "none.md") == 2


def test_results_study_reuses_its_runs_names_and_buys_ct_epochs_with_measured_cost(tmp_path):
    results = _results_module()
    args = SimpleNamespace(out=str(tmp_path), seeds=3, epochs=30, train=3000)
    study = results.Study(args, {"ct": 1.0, "st": 1.31, "stpp": 2.62})
    assert study.compute_epochs == {"st": 39, "stpp": 79}
    assert "epochs=39,79" in study.ct_compute
    # the sweeps the study started with keep their folders: same overrides, same order
    ct_st = "sweep recipes/fmnist_st.yaml seed=0,1,2 model.name=resnet20 epochs=30 "
    ct_st += "data.train_subset=3000 eval.every=30 + method=ct + method=st st.lam=1"
    assert " ".join(study.ct_st).startswith(ct_st)


def test_results_picks_finished_runs_by_their_overrides(tmp_path):
    results = _results_module()
    for name in ("seed=0,method=ct", "seed=0,method=st,st.lam=1", "seed=1,method=st,st.lam=1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text("{}")
    (tmp_path / "logs").mkdir()  # a sweep's logs folder is no run
    (tmp_path / "seed=2,method=st,st.lam=1").mkdir()  # unfinished
    assert len(results._runs_of(tmp_path)) == 3
    st = results._runs_of(tmp_path, method="st", st__lam="1")
    assert [Path(p).name for p in st] == ["seed=0,method=st,st.lam=1", "seed=1,method=st,st.lam=1"]


def test_results_archive_keeps_finished_runs_records_and_restores_them(tmp_path):
    results = _results_module()
    out, kept = tmp_path / "runs", tmp_path / "kept"
    done, unfinished = out / "ct_st" / "seed=0,method=ct", out / "ct_st" / "seed=1,method=ct"
    (done / "checkpoints").mkdir(parents=True)
    unfinished.mkdir(parents=True)
    for folder in (done, unfinished):
        (folder / "config.yaml").write_text("seed: 0\n")
        (folder / "metrics.jsonl").write_text('{"epoch": 0}\n')
    (done / "summary.json").write_text('{"main_acc": 80.0}')
    (done / "checkpoints" / "last.pt").write_bytes(b"weights")
    (out / "ct_st" / "sweep.json").write_text("{}")
    (out / "costs.json").write_text('{"relative": {"ct": 1.0}}')
    assert results.archive(out, kept) == 5
    names = sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file())
    assert names == [
        "commits.json",
        "costs.json",
        "ct_st/seed=0,method=ct/config.yaml",
        "ct_st/seed=0,method=ct/metrics.jsonl",
        "ct_st/seed=0,method=ct/summary.json",
        "ct_st/sweep.json",
    ]  # no checkpoint, nothing of the unfinished run
    assert list(json.loads((kept / "commits.json").read_text())) == ["ct_st/seed=0,method=ct"]
    assert results.archive(out, kept) == 0  # nothing new
    fresh = tmp_path / "fresh"
    assert results.restore(fresh, kept) == 5
    assert json.loads((fresh / "ct_st/seed=0,method=ct/summary.json").read_text())["main_acc"] == 80
    assert not (fresh / "commits.json").exists()


def test_results_outcome_pairs_each_arm_with_ct_by_seed(tmp_path):
    results = _results_module()
    accs = {"ct": (86.0, 85.5, 86.5), "stpp": (87.0, 85.0, 87.5)}
    groups = []
    for method, values in accs.items():
        runs = []
        for seed, acc in enumerate(values):
            run = tmp_path / f"{method}{seed}"
            run.mkdir()
            (run / "summary.json").write_text(json.dumps({"main_acc": acc}))
            runs.append(str(run))
        label = {"method": method, "epochs": "30", "model.drop_path_rate": "0.0"}
        groups.append({"label": label, "runs": runs, "seeds": [0, 1, 2]})
    groups[0]["main_acc"] = {"mean": 86.0, "std": 0.5, "n": 3}
    groups[1]["main_acc"] = {"mean": 86.5, "std": 1.32, "n": 3}
    groups[1]["paired_main_acc"] = {"mean": 0.5, "std": 0.87, "n": 3}
    lines = results._outcome({"groups": groups, "baseline": groups[0]["label"]}, epochs=30)
    assert lines[0].startswith("- CT (the baseline): main 86.00 ± 0.50%")
    assert "ST++: main 86.50 ± 1.32% (Δ +0.50 ± 0.87, above CT in 2 of 3 seeds)" in lines[1]
    longer = {**groups[0]["label"], "epochs": "83", "model.drop_path_rate": "0.05"}
    assert results._arm(longer, epochs=30) == "CT, 83 epochs, drop-path 0.05"


def test_results_motivation_outcome_pairs_base_and_motivated_with_their_ct(tmp_path):
    results = _results_module()

    def run(folder: str, name: str, **summary) -> None:
        path = tmp_path / folder / name
        path.mkdir(parents=True)
        (path / "summary.json").write_text(json.dumps(summary))

    for seed, (acc20, acc32) in enumerate([(86.0, 86.5), (85.0, 86.0)]):
        run("ct_st", f"seed={seed},method=ct", main_acc=acc20)
        run("ct_st", f"seed={seed},method=st,st.lam=1", main_acc=99.0)  # not a baseline
        run("ct32", f"seed={seed},model.name=resnet32", main_acc=acc32)
        for k, delta in (("1", 0.5), ("3", -0.5)):
            name = f"seed={seed},epochs=30,motivation.k={k}"
            run("motivation", name, base_acc=acc20 + delta, motivated_acc=acc32 - 1.0)
    lines = results._motivation_outcome(tmp_path)
    assert lines == [
        "- k 1: base 86.00 ± 0.71% (Δ +0.50 ± 0.00, above CT in 2 of 2 seeds); "
        "motivated 85.25 ± 0.35% (Δ -1.00 ± 0.00, above CT in 0 of 2 seeds)",
        "- k 3: base 85.00 ± 0.71% (Δ -0.50 ± 0.00, above CT in 0 of 2 seeds); "
        "motivated 85.25 ± 0.35% (Δ -1.00 ± 0.00, above CT in 0 of 2 seeds)",
    ]


def test_results_measures_the_sandwich_cost_once_per_n(tmp_path, monkeypatch):
    results = _results_module()
    runs = sys.modules["results_runs"]
    monkeypatch.setattr(runs, "COST_ROUNDS", 2)
    (tmp_path / "costs.json").write_text(json.dumps({"relative": {"ct": 1.0, "st": 1.2}}))
    cost = results.measure_sandwich_cost(tmp_path, 128, "2")  # 2 epochs of 1 step each
    report = json.loads((tmp_path / "costs.json").read_text())
    assert report["relative"] == {"ct": 1.0, "st": 1.2}  # the equal-compute costs unchanged
    assert report["sandwich"]["n"] == "2" and report["sandwich"]["relative"] == cost > 0
    assert [len(t) for t in report["sandwich"]["epoch_seconds"].values()] == [2, 2]
    monkeypatch.setattr(runs, "_epoch_seconds", None)  # read back, not measured again
    assert results.measure_sandwich_cost(tmp_path, 128, "2") == cost
