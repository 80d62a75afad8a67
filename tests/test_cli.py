"""The command line, in-process through ``main(argv)``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nestedtrain as nt
from nestedtrain.cli import main

TINY = ["data.train_subset=128", "batch_size=64", "epochs=1", "eval.subnets=none"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    recipe = out.parent / "tiny.yaml"
    recipe.write_text("method: st\nmodel:\n  name: resnet20\ndata:\n  name: digits\n")
    assert main(["train", str(recipe), *TINY, "--out", str(out)]) == 0
    return out


def test_train_writes_run_and_prints_summary(run_dir, capsys):
    assert (run_dir / "summary.json").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["method"] == "st"


def test_eval_all_subnets_of_resnet20(run_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", str(run_dir), "--subnets", "all", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report["subnets"]) == 27
    assert {"subnet", "acc", "flops", "params"} <= set(report["subnets"][0])
    assert report["main"]["flops"] == max(s["flops"] for s in report["subnets"])
    smallest = next(s for s in report["subnets"] if s["subnet"] == "1-1-1")
    assert smallest["params"] < report["main"]["params"]
    assert "main network:" in capsys.readouterr().out


def test_eval_listed_subnets(run_dir, tmp_path):
    out = tmp_path / "e.json"
    assert (
        main(
            [
                "eval",
                str(run_dir / "checkpoints" / "last.pt"),
                "--subnets",
                "3-2-1,1.-0.-0.2",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert [s["subnet"] for s in json.loads(out.read_text())["subnets"]] == ["3-2-1", "1.-1-0.2"]


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_plain_and_torchscript(run_dir, tmp_path, capsys):
    plain = tmp_path / "sub.pt"
    assert main(["export", str(run_dir), "--subnet", "1-1-1", "--out", str(plain)]) == 0
    state = torch.load(plain, weights_only=True)
    assert not any(k.startswith("layer1.1.") for k in state)
    small = nt.models.CifarResNet(1, num_classes=10, in_chans=1)
    small.load_state_dict(state)
    ts = tmp_path / "sub.ts"
    assert (
        main(["export", str(run_dir), "--subnet", "1-1-1", "--out", str(ts), "--torchscript"]) == 0
    )
    scripted = torch.jit.load(ts)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(scripted(x), small.eval()(x))


def test_flops_command(capsys):
    assert main(["flops", "resnet56", "--subnet", "5-5-5"]) == 0
    line = capsys.readouterr().out
    resnet32 = nt.flops.count_flops(nt.create_model("resnet32", num_classes=10), 32)
    assert f"{resnet32 / 1e6:.2f} MFLOPs" in line


def test_demo_quick(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "CT" in out and "ST" in out and "subnets mean" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if "subnets mean" in line)
    assert set(lines[header + 1]) == {"-", " "}  # printed by the CLI's one table layout
    assert lines[header + 2].split()[0] == "CT" and lines[header + 3].split()[0] == "ST"
    assert (tmp_path / "demo" / "st" / "summary.json").is_file()


def test_help_lists_recipe_fields(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "st.lam = 1.0" in text and "data.train_subset = None" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["model.name=resnet7"], "unknown model 'resnet7'"),
        (["data.name=mnist9"], "mnist9"),
        (["method=foo"], "unknown method 'foo'"),
        (["st.lam=-1"], "st.lam=-1"),
        (["optim.lr=-0.1"], "optim.lr=-0.1"),
        (["optim.lrr=0.1"], "optim.lrr"),
        (["epochs=three"], "epochs"),
        (["eval.subnets=3-3"], "has 2 stages but the model has 3"),
        (["eval.subnets=9-9-9"], "out of range"),
        (["epochs"], "key=value"),
        (["model.name=vit_tiny_patch16_224"], "cannot run on digits images of shape (1, 8, 8)"),
    ],
)
def test_bad_train_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["train", str(_recipe(tmp_path)), *TINY, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err and "Traceback" not in err
    assert not out.exists(), "a bad recipe left a run folder behind"


def _recipe(tmp_path: Path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text("method: ct\n")
    return path


def test_bad_checkpoints_and_subnets_exit_2(run_dir, tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(1)}, foreign)
    cases = [
        (["eval", str(garbage)], "cannot read checkpoint"),
        (["eval", str(foreign)], "is not a nestedtrain checkpoint"),
        (["eval", str(tmp_path / "missing.pt")], "does not exist"),
        (["eval", str(run_dir), "--subnets", "3-x-3"], "stage 2 is 'x'"),
        (
            ["export", str(run_dir), "--subnet", "3-3", "--out", str(tmp_path / "x.pt")],
            "has 2 stages",
        ),
        (["train", str(tmp_path / "nope.yaml")], "does not exist"),
        (["train", str(_recipe(tmp_path)), "--out", str(run_dir)], "already holds a run"),
        (["flops", "resnet7"], "unknown model"),
        (["bogus"], "invalid choice"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, (args, err)
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize(
    "override, hint",
    [
        ("model=resnet20", "did you mean model.name=resnet20?"),
        ("data=digits", "did you mean data.name=digits?"),
        ("st=5", "set one of its fields: st."),
    ],
)
def test_a_value_for_a_group_of_settings_says_what_to_write(tmp_path, capsys, override, hint):
    out = tmp_path / "run"
    assert main(["train", str(_recipe(tmp_path)), override, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    key = override.split("=")[0]
    assert f"override {override}: '{key}' is a group of settings; {hint}" in err
    assert "Merge error" not in err and not out.exists()
    sweep = ["sweep", str(_recipe(tmp_path)), override, "--out", str(tmp_path / "s"), "--print"]
    assert main(sweep) == 2 and hint in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["analyze", "subnets", "a run", "--space", "1", "--individual", "x.pt", "y.pt"],
        ["analyze", "destruct", "c.pt", "--permute-k", "", "--memory-mb", "0.05", "--bn", "own"],
        ["analyze", "kl-drift", "r", "--out", "o"],
        ["select", "r", "--max-mflops", "512", "--max-params", "0.123456789", "--seed", "3"],
        ["compare", "a", "b", "--by", "method", "--baseline", "method=ct"],
        ["train", "r.yaml", "epochs=3", "st.lam=5", "--resume"],
    ],
)
def test_recorded_command_line_reads_back_as_the_same_command(argv):
    import shlex

    from nestedtrain.cli import build_parser
    from nestedtrain.cli.common import command_line

    parser = build_parser()
    args = parser.parse_args(argv)
    words = shlex.split(command_line(args))
    assert words[0] == "nestedtrain" and words[1] == argv[0]
    assert vars(parser.parse_args(words[1:])) == vars(args)
    # defaults are left out: only what was given is written
    assert "--split" not in words and "--device" not in words


def test_recorded_command_line_leaves_out_defaults():
    from nestedtrain.cli import build_parser
    from nestedtrain.cli.common import command_line

    args = build_parser().parse_args(["select", "r", "--max-mflops", "512.0", "--seed", "0"])
    assert command_line(args) == "nestedtrain select r --max-mflops 512"


def test_a_bug_keeps_its_traceback(monkeypatch):
    import nestedtrain.cli.train as train_commands

    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not bad input")

    monkeypatch.setattr(train_commands, "count_flops", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["flops", "resnet20"])


def test_python_dash_m_nestedtrain_is_the_command():
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "nestedtrain", "flops", "resnet20", "--subnet", "1-1-1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "resnet20 sub-network 1-1-1 at 32x32x3:" in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "nestedtrain", "flops", "resnet7"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("nestedtrain: error: unknown model")


def test_batch_job_logs_a_progress_line_every_log_every_steps(tmp_path):
    # A real process whose stderr is a pipe, as a batch job's log: no progress bar, but a line
    # every log_every steps.
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("method: ct\nmodel:\n  name: resnet20\ndata:\n  name: digits\n")
    overrides = ["data.train_subset=256", "batch_size=32", "epochs=2", "eval.subnets=none"]
    proc = subprocess.run(
        [sys.executable, "-m", "nestedtrain", "train", str(recipe), *overrides, "log_every=3"]
        + ["--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    pattern = r"nestedtrain: epoch (\d)/2 step (\d)/8 loss \d+\.\d{4} \d+\.\d images/s"
    lines = re.findall(pattern, proc.stderr)
    assert lines == [(e, s) for e in "12" for s in "36"], proc.stderr
    assert "\r" not in proc.stderr  # no progress bar
