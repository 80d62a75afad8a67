"""The prepared benchmark scripts run end to end on the CPU at tiny sizes, so that a lent GPU's
few minutes are not spent finding a broken script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nestedtrain.data.datasets import FASHION_MNIST_SYSTEM_DIR

REPO = Path(__file__).resolve().parents[1]


def _run_script(name: str, args: list[str]) -> str:
    """``bench/NAME ARGS`` in a fresh process on one thread; it must exit 0. Its stdout."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / name), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
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
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
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
