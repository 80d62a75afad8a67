"""``nestedtrain latency-kit``, the kit's ``measure.py`` without torch, ``select
--latency-table`` and the additive latency predictor."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_model

import nestedtrain as nt
from nestedtrain.analysis import kit_measure
from nestedtrain.analysis import latency as latency_module
from nestedtrain.analysis.latency import (
    kit_subnets,
    model_identity,
    read_latency_table,
    write_latency_kit,
)
from nestedtrain.cli import main
from nestedtrain.errors import ConfigError
from nestedtrain.flops import count_flops, count_params

TINY = ["data.train_subset=256", "batch_size=64", "epochs=1", "eval.subnets=none"]
HELD_OUT = 4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kitrun") / "run"
    recipe = out.parent / "tiny.yaml"
    recipe.write_text("method: st\nmodel:\n  name: resnet20\ndata:\n  name: digits\n")
    assert main(["train", str(recipe), *TINY, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def kit(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kit") / "kit"
    assert main(["latency-kit", str(run_dir), "--out", str(out), "--held-out", str(HELD_OUT)]) == 0
    return out


def _no_torch_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python cannot import torch or nestedtrain (a sitecustomize
    blocks them), as on a device with only numpy and onnxruntime."""
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(
        "import sys\nsys.modules['torch'] = None\nsys.modules['nestedtrain'] = None\n"
    )
    return {**os.environ, "PYTHONPATH": str(blocker), "OMP_NUM_THREADS": "1"}


def _measure(kit: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(kit / "measure.py"), "--kit", str(kit), *args],
        env=_no_torch_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def table(kit, tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("device")
    out = where / "latency.json"
    args = ["--out", str(out), "--threads", "1", "--warmup", "1", "--repeats", "6"]
    result = _measure(kit, where, *args, "--providers", "CPUExecutionProvider")
    assert result.returncode == 0, result.stderr
    return out


# --------------------------------------------------------------------------------- the kit
def test_kit_holds_the_front_the_main_network_and_held_out_files(kit, run_dir):
    manifest = json.loads((kit / "manifest.json").read_text())
    files = manifest["files"]
    roles = [f["role"] for f in files]
    assert roles.count("main") == 1 and roles.count("held_out") == HELD_OUT
    assert roles.count("front") >= 1 and roles.count("fit") >= 1
    model, cfg, _ = nt.load_model(run_dir)
    assert manifest["model"] == model_identity(model, "resnet20", 1, 8)
    assert manifest["input_shape"] == [1, 1, 8, 8]
    subnets = [f["subnet"] for f in files]
    assert len(set(subnets)) == len(subnets) and "3-3-3" in subnets
    for f in files:
        assert kit_measure.file_sha256(kit / f["file"]) == f["sha256"]
        subnet = nt.Subnet.parse(model, f["subnet"])
        assert f["flops"] == count_flops(model, 8, 1, subnet=subnet)
        assert f["params"] == count_params(model, subnet=subnet)
    assert sorted(p.name for p in kit.iterdir()) == sorted(
        [*(f["file"] for f in files), "manifest.json", "measure.py"]
    )


def test_kit_into_a_used_folder_is_refused(run_dir, tmp_path, capsys):
    (tmp_path / "kit").mkdir()
    (tmp_path / "kit" / "mine.txt").write_text("keep")
    assert main(["latency-kit", str(run_dir), "--out", str(tmp_path / "kit")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not an empty folder" in err
    assert [p.name for p in (tmp_path / "kit").iterdir()] == ["mine.txt"]


def test_kit_subnets_are_seeded_and_determine_every_stage_cost():
    model = nt.create_model("resnet32", num_classes=10, in_chans=1)
    pool = nt.OrderedSampler(model).all()
    front = [nt.Subnet.parse(model, "1-1-2")]
    kit = kit_subnets(model, front, pool, held_out=5, seed=3, fit=4)
    assert kit == kit_subnets(model, front, pool, held_out=5, seed=3, fit=4)
    assert kit != kit_subnets(model, front, pool, held_out=5, seed=4, fit=4)
    roles = {str(s): role for s, role in kit}
    assert roles["1-1-2"] == "front" and roles["5-5-5"] == "main"
    assert all(roles[c] == "fit" for c in ("1-1-1", "5-1-1", "1-5-1", "1-1-5"))
    assert sorted(roles.values()).count("fit") == 4 + 4 and len(roles) == len(kit)
    assert list(roles.values()).count("held_out") == 5


@pytest.mark.parametrize(
    "args, message",
    [(["--held-out", "-1"], "--held-out -1 must be >= 0"), (["--fit", "-2"], "--fit -2")],
)
def test_bad_kit_options_are_one_line(run_dir, tmp_path, capsys, args, message):
    assert main(["latency-kit", str(run_dir), "--out", str(tmp_path / "kit"), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "kit").exists()


def test_a_failed_export_leaves_no_kit_behind(tmp_path, monkeypatch):
    model = nt.create_model("resnet20", num_classes=10, in_chans=1)
    subnets = kit_subnets(model, [], nt.OrderedSampler(model).all(), held_out=1, fit=0)
    real, calls = latency_module.export_onnx, []

    def export_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise ConfigError("ONNX parity check failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(latency_module, "export_onnx", export_then_fail)
    with pytest.raises(ConfigError, match="parity"):
        write_latency_kit(
            model, subnets, tmp_path / "kit", model_name="r", input_size=8, in_chans=1
        )
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []


def test_the_blocker_really_blocks_torch(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "import torch"], env=_no_torch_env(tmp_path), capture_output=True
    )
    assert result.returncode != 0 and b"torch" in result.stderr


def test_measure_runs_without_torch_on_the_cpu_provider(kit, table):
    data = json.loads(table.read_text())
    manifest = json.loads((kit / "manifest.json").read_text())
    assert [e["subnet"] for e in data["entries"]] == [f["subnet"] for f in manifest["files"]]
    for entry in data["entries"]:
        assert len(entry["samples_ms"]) == 6 and entry["ms"] > 0
        assert entry["p25_ms"] <= entry["ms"] <= entry["p75_ms"]
    machine = data["machine"]
    assert machine["providers"] == ["CPUExecutionProvider"] and machine["threads"] == 1
    assert machine["cores"] and machine["cpu"] and machine["onnxruntime"]
    assert data["model"] == manifest["model"] and data["batch"] == 1
    held = data["predictor"]["held_out"]
    assert held["n"] == HELD_OUT and 0 <= held["within_10pct"] <= 1


@pytest.mark.parametrize("damage", ["missing", "changed"])
def test_measure_refuses_a_kit_that_is_not_whole(kit, tmp_path, damage):
    copy = tmp_path / "kit"
    shutil.copytree(kit, copy)
    victim = copy / json.loads((kit / "manifest.json").read_text())["files"][1]["file"]
    if damage == "missing":
        victim.unlink()
    else:
        victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    result = _measure(copy, tmp_path, "--out", str(tmp_path / "latency.json"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert victim.name in result.stderr and damage in result.stderr
    assert not (tmp_path / "latency.json").exists()


def test_measure_refuses_a_provider_that_is_not_there(kit, tmp_path):
    result = _measure(kit, tmp_path, "--providers", "NoSuchExecutionProvider")
    assert result.returncode == 2 and "NoSuchExecutionProvider" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_kit_of_a_timm_model_through_the_library(tmp_path):
    """The kit is built from a model, not a run folder: a timm MobileNetV3 (six stages, two of
    them a single block) goes through kit, measure.py and table."""
    model, side = make_model("timm-mobilenetv3")
    pool = nt.OrderedSampler(model).all()
    subnets = kit_subnets(model, [], pool, held_out=3, fit=2)
    kit = tmp_path / "kit"
    write_latency_kit(
        model, subnets, kit, model_name="mobilenetv3_small_050", input_size=side, in_chans=3
    )
    args = ["--out", str(tmp_path / "t.json"), "--threads", "1", "--warmup", "1", "--repeats", "3"]
    assert _measure(kit, tmp_path, *args).returncode == 0
    identity = model_identity(model, "mobilenetv3_small_050", 3, side)
    table = read_latency_table(tmp_path / "t.json", identity, max_error=100.0)
    fit = table.predictor["fit"]
    assert fit["fixed_blocks"] == {"0": 1, "5": 1}  # single-block stages: part of the constant
    unmeasured = next(s for s in pool if str(s) not in table.measured)
    ms, source = table.latency(unmeasured)
    assert source == "predicted" and ms == kit_measure.predict(
        fit, [len(b) for b in unmeasured.blocks]
    )
    with pytest.raises(ConfigError, match="was measured for mobilenetv3_small_050"):
        read_latency_table(tmp_path / "t.json", model_identity(model, "x", 3, side * 2))


# --------------------------------------------------------------------------- the predictor
def test_fitted_additive_model_recovers_known_costs():
    intercept, costs = 0.25, [0.1, 0.3, 0.05]
    blocks = [[a, b, c] for a in (1, 2, 3) for b in (1, 3) for c in (1, 2, 4)]
    ms = [intercept + sum(n * k for n, k in zip(row, costs)) for row in blocks]
    fit = kit_measure.fit_additive(blocks, ms)
    assert fit["intercept_ms"] == pytest.approx(intercept, abs=1e-12)
    assert fit["block_ms"] == pytest.approx(costs, abs=1e-12)
    assert kit_measure.predict(fit, [5, 5, 5]) == pytest.approx(intercept + 5 * sum(costs))
    # too few measurements to tell the stages apart: no fit rather than a guess
    assert kit_measure.fit_additive([[1, 1, 1], [2, 2, 2]], [1.0, 2.0]) is None
    # a stage that never varied is part of the constant, and is not predicted elsewhere
    fixed = kit_measure.fit_additive([[1, 2, 3], [2, 2, 3], [1, 2, 4]], [1.0, 1.5, 2.0])
    assert fixed["fixed_blocks"] == {"1": 2} and kit_measure.predict(fixed, [1, 3, 3]) is None


def test_predictor_error_is_measured_on_the_held_out_files_only():
    def ms(blocks):
        return 0.2 + 0.1 * blocks[0] + 0.4 * blocks[1]

    fit_on = [[1, 1], [3, 1], [1, 3], [3, 3]]
    held = {(2, 2): 1.3, (2, 1): 1.0, (1, 2): 1.0}  # off by these factors
    entries = [{"role": "fit", "blocks_per_stage": b, "ms": ms(b)} for b in fit_on]
    entries += [
        {"role": "held_out", "blocks_per_stage": list(b), "ms": ms(b) * f} for b, f in held.items()
    ]
    report = kit_measure.predictor(entries)
    assert report["fitted_on"] == 4 and report["fit_error"]["worst"] == pytest.approx(0, abs=1e-9)
    assert report["fit"]["block_ms"] == pytest.approx([0.1, 0.4])  # the held-out ones not fitted
    held_out = report["held_out"]
    assert held_out["n"] == 3
    assert held_out["worst"] == pytest.approx(0.3 / 1.3)  # |1 - 1.3| / 1.3
    assert held_out["median"] == pytest.approx(0, abs=1e-9)
    assert held_out["within_10pct"] == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------ select
def _select(run: Path, out: Path, *args: str) -> dict:
    assert main(["select", str(run), "--out", str(out), *args]) == 0
    return json.loads((out / "select.json").read_text())


def test_select_reads_latencies_from_the_table(run_dir, table, tmp_path, capsys):
    payload = _select(run_dir, tmp_path / "sel", "--latency-table", str(table))
    out = capsys.readouterr().out
    assert f"latency from the table {table}" in out and "held-out relative error" in out
    measured = {e["subnet"]: e["ms"] for e in json.loads(table.read_text())["entries"]}
    for row in payload["subnets"]:
        if row["subnet"] in measured:
            assert (row["latency_ms"], row["latency_source"]) == (
                measured[row["subnet"]],
                "measured",
            )
    spec = payload["latency"]
    assert spec["source"] == "table" and spec["machine"]["providers"] == ["CPUExecutionProvider"]
    assert set(spec["predictor"]["held_out"]) == {"n", "median", "worst", "within_10pct"}
    assert (tmp_path / "sel" / "select.png").is_file()


def _rewrite(table: Path, to: Path, ms: dict[str, float], default: float) -> Path:
    data = json.loads(table.read_text())
    for entry in data["entries"]:
        entry["ms"] = ms.get(entry["subnet"], default)
    to.write_text(json.dumps(data))
    return to


def test_select_picks_from_the_table_not_from_flops(run_dir, table, tmp_path, capsys):
    # One held-out sub-network made the only fast one: the pick must follow the table.
    entries = json.loads(table.read_text())["entries"]
    fast = next(e["subnet"] for e in entries if e["role"] == "held_out")
    fake = _rewrite(table, tmp_path / "fake.json", {fast: 0.1}, default=1.0)
    payload = _select(
        run_dir, tmp_path / "sel", "--latency-table", str(fake), "--max-latency-ms", "0.5"
    )
    assert payload["pick"]["subnet"] == fast and payload["pick"]["latency_source"] == "measured"
    # 0.1 against the fit's 1.0: a held-out error of 900%, so nothing is predicted
    assert not payload["latency"]["predicting"]
    assert all(r["latency_source"] != "predicted" for r in payload["subnets"])
    assert "NOT used" in capsys.readouterr().out


def test_prediction_threshold_is_the_users(run_dir, table, tmp_path, capsys):
    # An exactly additive table but for one held-out file off by 15%.
    data = json.loads(table.read_text())
    held = next(e["subnet"] for e in data["entries"] if e["role"] == "held_out")
    ms = {e["subnet"]: 0.1 + 0.01 * sum(e["blocks_per_stage"]) for e in data["entries"]}
    ms[held] *= 1.15
    fake = _rewrite(table, tmp_path / "fake.json", ms, default=0)
    loose = _select(run_dir, tmp_path / "a", "--latency-table", str(fake))
    assert loose["latency"]["predicting"]
    predicted = [r for r in loose["subnets"] if r["latency_source"] == "predicted"]
    assert len(predicted) == len(loose["subnets"]) - len(ms)
    blocks = {r["subnet"]: r["depths"] for r in predicted}
    assert all(
        r["latency_ms"] == pytest.approx(0.1 + 0.01 * sum(blocks[r["subnet"]]), rel=1e-6)
        for r in predicted
    )
    strict = _select(
        run_dir, tmp_path / "b", "--latency-table", str(fake), "--max-prediction-error", "10"
    )
    assert not strict["latency"]["predicting"]
    assert [r for r in strict["subnets"] if r["latency_ms"] is not None] == [
        r for r in strict["subnets"] if r["subnet"] in ms
    ]
    assert "is above the 10% allowed" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, message",
    [
        ("model", "was measured for resnet32 (blocks 5-5-5) on 1x8x8 input"),
        ("input", "on 1x28x28 input, not for this resnet20"),
        ("kind", "is not a latency table"),
        ("entries", "lacks the model, its entries or their latencies"),
    ],
)
def test_a_table_of_another_model_is_refused(run_dir, table, tmp_path, capsys, change, message):
    data = json.loads(table.read_text())
    if change == "model":
        other = nt.create_model("resnet32", num_classes=10, in_chans=1)
        data["model"] = model_identity(other, "resnet32", 1, 8)
    elif change == "input":
        data["model"]["input_shape"] = [1, 28, 28]
    else:
        data.pop(change)
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps(data))
    out = tmp_path / "sel"
    assert main(["select", str(run_dir), "--latency-table", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_table_and_local_measurement_exclude_each_other(run_dir, table, tmp_path, capsys):
    args = ["--latency-table", str(table), "--latency-device", "cpu", "--out", str(tmp_path)]
    assert main(["select", str(run_dir), *args]) == 2
    assert "give one of them" in capsys.readouterr().err


def test_a_kit_of_weights_trained_elsewhere_serves_the_runs_table(run_dir, kit, table, tmp_path):
    """``latency-kit --model NAME --weights FILE --data ...`` opens a plain state_dict as the
    analyses do; its kit is the run's (same model, input, files), so one table serves both."""
    out = tmp_path / "kit"
    argv = ["latency-kit", "--model", "resnet20", "--weights", str(run_dir / "weights.pt")]
    argv += ["--data", "digits", "--out", str(out), "--held-out", str(HELD_OUT)]
    assert main(argv) == 0
    ours, theirs = (json.loads((k / "manifest.json").read_text()) for k in (out, kit))
    assert ours["model"] == theirs["model"] and ours["input_shape"] == theirs["input_shape"]
    assert [f["subnet"] for f in ours["files"]] == [f["subnet"] for f in theirs["files"]]
    select = ["select", "--model", "resnet20", "--weights", str(run_dir / "weights.pt")]
    select += ["--data", "digits", "--latency-table", str(table), "--max-latency-ms", "1000"]
    assert main([*select, "--out", str(tmp_path / "select")]) == 0
