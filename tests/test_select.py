"""``nestedtrain select`` and deploying sub-networks (state_dict, TorchScript, ONNX)."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
from conftest import make_model
from oracle import evaluate_one_at_a_time

import nestedtrain as nt
from nestedtrain.analysis import Budget, LatencySpec, pareto_front, select_subnet
from nestedtrain.analysis.report import write_report
from nestedtrain.cli import main
from nestedtrain.data import build_data
from nestedtrain.deploy import deploy_subnet, export_onnx
from nestedtrain.evaluation import evaluate
from nestedtrain.flops import count_flops, count_params

TINY = ["data.train_subset=256", "batch_size=64", "epochs=2", "eval.subnets=none"]


def _train(tmp_path_factory, name: str, *overrides: str) -> Path:
    out = tmp_path_factory.mktemp(name) / "run"
    recipe = out.parent / "tiny.yaml"
    recipe.write_text("method: st\nmodel:\n  name: resnet20\ndata:\n  name: digits\n")
    assert main(["train", str(recipe), *TINY, *overrides, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return _train(tmp_path_factory, "select")


def _select(run: Path, out: Path, *args: str) -> dict:
    assert main(["select", str(run), "--out", str(out), *args]) == 0
    return json.loads((out / "select.json").read_text())


def _brute_force(run: Path) -> dict[str, dict]:
    """Every sub-network evaluated on its own (BN re-estimated one at a time), with its cost."""
    model, cfg, _ = nt.load_model(run)
    data = build_data(cfg.data, batch_size=cfg.batch_size, seed=cfg.seed, device="cpu")
    batch = cfg.eval.batch_size
    side = data.test_img_size
    rows = {}
    for split in ("val", "test"):
        subnets = nt.OrderedSampler(model).all()
        others = [s for s in subnets if not s.is_full(model)]
        results = evaluate_one_at_a_time(
            model,
            others,
            lambda split=split: data.eval_batches(split, batch_size=batch),
            lambda: data.calibration_batches(batch_size=batch),
        )
        main_acc = evaluate(model, data.eval_batches(split, batch_size=batch))["acc"]
        for subnet in subnets:
            row = rows.setdefault(
                str(subnet),
                {
                    "flops": count_flops(model, side, 1, subnet=subnet),
                    "params": count_params(model, subnet=subnet),
                },
            )
            own = next((r["acc"] for r in results if r["subnet"] == str(subnet)), main_acc)
            row[f"{split}_acc"] = own
    return rows


def test_select_picks_the_brute_force_best_under_a_flops_budget(run_dir, tmp_path, capsys):
    truth = _brute_force(run_dir)
    flops = sorted(r["flops"] for r in truth.values())
    budget = flops[len(flops) // 2] / 1e6  # about half of the sub-networks fit
    payload = _select(run_dir, tmp_path / "sel", "--max-mflops", f"{budget}")
    assert payload["selection_split"] == "val" and payload["evaluated"].startswith("all 27")
    got = {r["subnet"]: r for r in payload["subnets"]}
    assert set(got) == set(truth)
    for subnet, row in truth.items():
        for key in ("flops", "params"):
            assert got[subnet][key] == row[key], (subnet, key)
        for key in ("val_acc", "test_acc"):
            assert got[subnet][key] == pytest.approx(row[key], abs=1e-9), (subnet, key)
    fitting = [s for s, r in truth.items() if r["flops"] <= budget * 1e6]
    best = max(
        fitting, key=lambda s: (truth[s]["val_acc"], -truth[s]["flops"], -truth[s]["params"])
    )
    assert payload["pick"]["subnet"] == best
    assert truth[best]["val_acc"] == max(truth[s]["val_acc"] for s in fitting)
    printed = capsys.readouterr().out
    assert f"pick: {best} (val " in printed and "Pareto front, val top-1 vs FLOPs" in printed
    assert (tmp_path / "sel" / "select.png").stat().st_size > 0
    assert payload["command"].startswith("nestedtrain select ")


def test_front_is_non_dominated_and_complete(run_dir, tmp_path):
    payload = _select(run_dir, tmp_path / "sel")
    rows = payload["subnets"]

    def dominates(a: dict, b: dict) -> bool:
        no_worse = a["flops"] <= b["flops"] and a["val_acc"] >= b["val_acc"]
        return no_worse and (a["flops"] < b["flops"] or a["val_acc"] > b["val_acc"])

    front = [r for r in rows if r["on_front"]]
    assert (
        front and [r["subnet"] for r in sorted(front, key=lambda r: r["flops"])] == payload["front"]
    )
    for r in front:
        assert not any(dominates(o, r) for o in rows), r["subnet"]
    for r in rows:
        if not r["on_front"]:  # dominated by, or equal to, a front member
            assert any(f["flops"] <= r["flops"] and f["val_acc"] >= r["val_acc"] for f in front)
    # without a budget the pick is the most accurate on val
    assert payload["pick"]["val_acc"] == max(r["val_acc"] for r in rows)


def test_pareto_front_on_ties():
    rows = [
        {"c": 1, "a": 5.0},
        {"c": 1, "a": 7.0},
        {"c": 2, "a": 7.0},  # as accurate as a cheaper one: dominated
        {"c": 3, "a": 9.0},
        {"c": 3, "a": 9.0},  # equal to the one above: that one stands for both
        {"c": 4, "a": None},
    ]
    assert pareto_front(rows, "c", "a") == [1, 3]


def _toy_setup(seed: int = 0):
    model, _ = make_model("cifar-resnet20", seed)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(96, 3, 16, 16, generator=g)
    labels = torch.randint(0, 10, (96,), generator=g)

    def batches(lo: int, hi: int):
        return lambda: [(images[i : i + 16], labels[i : i + 16]) for i in range(lo, hi, 16)]

    calib = lambda: [images[i : i + 32] for i in range(0, 96, 32)]  # noqa: E731
    return model, batches(0, 48), batches(48, 96), calib


def test_latency_budget_uses_measured_latencies():
    model, val, test, calib = _toy_setup()
    # Fake latencies that disagree with FLOPs: deeper stage 3 is cheap, deeper stage 1 slow.
    measured: list[str] = []

    def fake(module, subnet, spec):
        measured.append(str(subnet))
        d1, d2, d3 = subnet.depths
        return {"ms": 1.0 + 2.0 * d1 + 0.5 * d2 + 0.1 * d3}

    common = dict(
        val_batches=val,
        test_batches=test,
        calib_batches=calib,
        input_size=16,
        in_chans=3,
        latency=LatencySpec(),
        latency_fn=fake,
    )
    limit = 4.0
    result = select_subnet(
        model, nt.OrderedSampler(model).all(), budget=Budget(max_latency_ms=limit), **common
    )
    rows = {r["subnet"]: r for r in result["subnets"]}
    timed = {s for s, r in rows.items() if r["latency_ms"] is not None}
    assert timed and timed == set(measured)
    for s in timed:
        d1, d2, d3 = rows[s]["depths"]
        assert rows[s]["latency_ms"] == 1.0 + 2.0 * d1 + 0.5 * d2 + 0.1 * d3
    # only the FLOPs front (and the main network) is timed, never estimated
    assert timed <= set(result["front"]) | {result["main"]["subnet"]}
    pick = result["pick"]
    assert pick["latency_ms"] is not None and pick["latency_ms"] <= limit
    best = max(
        (s for s in timed if rows[s]["latency_ms"] <= limit),
        key=lambda s: (rows[s]["val_acc"], -rows[s]["flops"], -rows[s]["params"]),
    )
    assert pick["subnet"] == best
    for s in result["latency_front"]:  # non-dominated in (latency, accuracy)
        r = rows[s]
        assert not any(
            o["latency_ms"] is not None
            and o["latency_ms"] <= r["latency_ms"]
            and o["val_acc"] >= r["val_acc"]
            and (o["latency_ms"] < r["latency_ms"] or o["val_acc"] > r["val_acc"])
            for o in rows.values()
        )
    with pytest.raises(ValueError, match="fastest measured, 1-1-1, takes 3.600 ms"):
        select_subnet(
            model, nt.OrderedSampler(model).all(), budget=Budget(max_latency_ms=1.0), **common
        )


def test_select_measures_latency_on_the_cli(run_dir, tmp_path, capsys):
    payload = _select(
        run_dir, tmp_path / "sel", "--max-latency-ms", "1000", "--latency-repeats", "3"
    )
    spec = payload["latency"]
    assert (
        spec["device"] == "cpu"
        and spec["batch"] == 1
        and spec["threads"] == torch.get_num_threads()
    )
    front = [r for r in payload["subnets"] if r["on_front"]]
    assert all(r["latency_ms"] > 0 for r in front)
    assert payload["pick"]["latency_ms"] is not None
    assert "latency measured on cpu, batch 1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--max-mflops", "0.01"],
            "no sub-network fits the budget (<= 0.01 MFLOPs): the smallest, 1-1-1, costs",
        ),
        (["--max-params", "0.001"], "the smallest, 1-1-1, costs"),
        (["--max-mflops", "-1"], "--max-mflops -1: give a positive number"),
        (["--max-latency-ms", "0"], "--max-latency-ms 0: give a positive number"),
        (["--max-latency-ms", "1e-9"], "the fastest measured, 1-1-1, takes"),
        (["--latency-batch", "0"], "--latency-batch 0 must be >= 1"),
        (["--format", "onnx"], "--format onnx needs --export PATH"),
        (["--latency-device", "nope"], "latency device 'nope' is not a device"),
        (["--space", "9,9"], "9"),
        (["--max-mflops", "x"], "invalid float value"),
    ],
)
def test_bad_select_input_is_one_line_exit_2(run_dir, tmp_path, capsys, args, message):
    out = tmp_path / "sel"
    assert main(["select", str(run_dir), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only machine")
def test_latency_on_missing_cuda_is_one_line(run_dir, tmp_path, capsys):
    assert main(["select", str(run_dir), "--latency-device", "cuda", "--out", str(tmp_path)]) == 2
    assert "CUDA is not available on this machine" in capsys.readouterr().err


def test_missing_validation_split_needs_an_explicit_flag(tmp_path_factory, tmp_path, capsys):
    run = _train(tmp_path_factory, "noval", "data.val_size=0")
    capsys.readouterr()
    assert main(["select", str(run), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "no validation split" in err and "--select-on test" in err
    payload = _select(run, tmp_path / "b", "--select-on", "test")
    assert payload["selection_split"] == "test"
    assert payload["pick"]["val_acc"] is None and payload["pick"]["test_acc"] is not None
    assert "selection on the TEST split" in capsys.readouterr().out


def test_report_includes_the_pareto_plot(run_dir, capsys):
    assert main(["select", str(run_dir), "--max-mflops", "4"]) == 0
    md_path, html_path = write_report(run_dir)
    text = md_path.read_text()
    assert "analysis/select/select.png" in text and "Pareto front, val top-1 vs FLOPs" in text
    assert "data:image/png;base64," in html_path.read_text()


def test_select_exports_the_pick_as_onnx(run_dir, tmp_path, capsys):
    path = tmp_path / "deploy" / "pick.onnx"
    payload = _select(run_dir, tmp_path / "sel", "--max-mflops", "3", "--export", str(path))
    sidecar = json.loads((tmp_path / "deploy" / "pick.onnx.json").read_text())
    assert sidecar["subnet"] == payload["pick"]["subnet"] == payload["export"]["subnet"]
    # the exported module's accuracy is the one the selection measured
    assert sidecar["accuracy"]["val"] == pytest.approx(payload["pick"]["val_acc"], abs=1e-9)
    assert sidecar["accuracy"]["test"] == pytest.approx(payload["pick"]["test_acc"], abs=1e-9)
    assert sidecar["source_run"] == str(run_dir) and sidecar["dataset"] == "digits"
    assert sidecar["input"]["size"] == 8 and sidecar["input"]["mean"] == [0.3053]
    assert sidecar["num_classes"] == 10 and sidecar["flops"] == payload["pick"]["flops"]
    assert sidecar["onnx"]["max_abs_diff"] <= 1e-4
    assert "max |logits difference| vs PyTorch" in capsys.readouterr().out


# ------------------------------------------------------------------------------- export
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_cli_formats_and_sidecars(run_dir, tmp_path, capsys):
    for name, extra in (
        ("a.pt", []),
        ("a.ts", []),
        ("a.onnx", []),
        ("b.bin", ["--format", "onnx"]),
    ):
        out = tmp_path / name
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code = main(["export", str(run_dir), "--subnet", "2-1-3", "--out", str(out), *extra])
        assert code == 0
        # no exporter deprecation or tracer noise reaches the user
        assert not [str(w.message) for w in caught], name
        sidecar = json.loads(out.with_name(name + ".json").read_text())
        assert sidecar["subnet"] == "2-1-3" and sidecar["file"] == name
        assert set(sidecar["accuracy"]) == {"val", "test"}
        mask = os.umask(0)
        os.umask(mask)
        for written in (out, out.with_name(name + ".json")):  # not mkstemp's owner-only mode
            assert written.stat().st_mode & 0o777 == 0o666 & ~mask
    printed = capsys.readouterr().out
    assert printed.count("ONNX check: onnx.checker passed") == 2
    assert "Warning" not in printed
    state = torch.load(tmp_path / "a.pt", weights_only=True)
    plain = nt.models.CifarResNet((2, 1, 3), num_classes=10, in_chans=1)
    plain.load_state_dict(state, strict=True)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        want = plain.eval()(x)
        torch.testing.assert_close(torch.jit.load(tmp_path / "a.ts")(x), want)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "a.onnx"))
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    assert (got - want).abs().max() <= 1e-4


def test_onnx_without_the_extra_says_what_to_install(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes the import fail
    out = tmp_path / "x.onnx"
    assert main(["export", str(run_dir), "--subnet", "1-1-1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pip install 'nestedtrain[deploy]'" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "family, subnet",
    [
        ("cifar-resnet20", "2-1-3"),
        ("timm-resnet18", "1-2-1-2"),
        ("timm-mobilenetv3", "1-1-2-1-2-1"),
        ("timm-vit_tiny", "7"),
    ],
)
def test_onnx_parity(family, subnet, tmp_path):
    model, side = make_model(family)
    model.eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(16, 3, side, side, generator=g)
    path = tmp_path / "m.onnx"
    sidecar = deploy_subnet(
        model,
        subnet,
        path,
        input_size=side,
        in_chans=3,
        num_classes=model.num_classes,
        model_name=family,
        check_images=images,
    )
    assert sidecar["format"] == "onnx" and sidecar["onnx"]["checker"] == "passed"
    assert sidecar["onnx"]["max_abs_diff"] <= 1e-4
    import onnx
    import onnxruntime

    onnx.checker.check_model(onnx.load(str(path)))
    session = onnxruntime.InferenceSession(str(path))
    other = torch.randn(3, 3, side, side, generator=g)  # another batch size: the batch is dynamic
    got = torch.from_numpy(session.run(None, {"images": other.numpy()})[0])
    with torch.no_grad():
        want = nt.export_subnet(model, subnet).eval()(other)
    assert (got - want).abs().max().item() <= 1e-4


def test_onnx_parity_failure_writes_nothing(tmp_path):
    model, side = make_model("cifar-resnet20")
    path = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match="ONNX parity check failed: max \\|logits difference\\|"):
        export_onnx(model.eval(), path, torch.randn(4, 3, side, side), tolerance=-1.0)
    assert not path.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "name, kwargs, subnet, plain",
    [
        ("resnet56", {}, "5-5-5", "nestedtrain.create_model('resnet32'"),
        (
            "resnet50",
            {},
            "3-4-4-3",
            "timm.create_model('resnet50', num_classes=7, in_chans=3, layers=(3, 4, 4, 3))",
        ),
        (
            "vit_tiny_patch16_224",
            {"img_size": 32, "patch_size": 8},
            "5",
            "depth=5)",
        ),
    ],
)
def test_state_dict_loads_strictly_into_the_plain_model(
    name, kwargs, subnet, plain, tmp_path, monkeypatch
):
    torch.manual_seed(0)
    model = nt.create_model(name, num_classes=7, in_chans=3, **kwargs).eval()
    path = tmp_path / "small.pt"
    sidecar = deploy_subnet(
        model,
        subnet,
        path,
        input_size=32,
        in_chans=3,
        num_classes=7,
        model_name=name,
        model_kwargs=kwargs,
    )
    recipe = sidecar["rebuild"]["plain_model"]
    assert plain in recipe
    # run the documented Python, as a user would, next to the file
    monkeypatch.chdir(tmp_path)
    for key in ("plain_model", "any_family"):
        scope = {"torch": torch, "timm": timm, "nestedtrain": nt}
        exec(sidecar["rebuild"][key], scope)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(
                scope["model"].eval()(x), nt.export_subnet(model, subnet).eval()(x)
            )


def test_mobilenet_state_dict_has_a_rebuild_through_export_subnet(tmp_path):
    model, side = make_model("timm-mobilenetv3")
    sidecar = deploy_subnet(
        model,
        "1-1-2-1-2-1",
        tmp_path / "m.pt",
        input_size=side,
        in_chans=3,
        num_classes=7,
        model_name="mobilenetv3_small_050",
    )
    assert "plain_model" not in sidecar["rebuild"]  # timm builds it from an architecture string
    assert "nestedtrain.export_subnet(" in sidecar["rebuild"]["any_family"]


def test_a_space_too_large_is_sampled_and_says_so(run_dir, tmp_path, capsys):
    payload = _select(run_dir, tmp_path / "sel", "--max-evaluated", "5", "--seed", "3")
    subnets = [r["subnet"] for r in payload["subnets"]]
    assert "1-1-1" in subnets and "3-3-3" in subnets and len(subnets) == payload["sample"] <= 7
    assert payload["evaluated"].startswith("a seeded sample (seed 3) of")
    assert "a seeded sample (seed 3)" in capsys.readouterr().out
