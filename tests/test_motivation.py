"""Motivation training: the library against Algorithm 1 written out plainly, the switch rules,
resume, the CLI run, the efficiency and tune-k commands, the recipes and the k-fold split."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import crash_after_first_epoch_then_resume, torchrun_two

import nestedtrain as nt
from nestedtrain.analysis.motivation import efficiency
from nestedtrain.cli import main
from nestedtrain.data import DataConfig, build_data
from nestedtrain.data.datasets import FASHION_MNIST_SYSTEM_DIR
from nestedtrain.data.partition import split_train
from nestedtrain.elastic.weightmap import WeightMap
from nestedtrain.engine.build import build_model, build_motivated_model, build_optimizer
from nestedtrain.engine.trainer import Trainer
from nestedtrain.evaluation import evaluate
from nestedtrain.methods import MotivationTraining
from nestedtrain.methods.conditions import Condition, LossDecrease

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DIGITS = RECIPES / "motivation_digits_resnet20_32.yaml"
SMALL = ["data.train_subset=192", "batch_size=32", "eval.subnets=none", "optim.lr=0.05"]


def _cfg(*overrides):
    return nt.load_config(DIGITS, [*SMALL, *overrides])


@pytest.fixture(scope="module")
def digits():
    cfg = DataConfig(crop="none", train_subset=192)
    return build_data(cfg, batch_size=32, seed=0, device=torch.device("cpu"))


# ------------------------------------------------------------ Algorithm 1, written out plainly
def _depth_map(name: str) -> str:
    """resnet20 (3 blocks per stage) inside resnet32 (5): blocks 0, 1 -> 0, 1; block 2 -> 4."""
    match = re.match(r"(layer\d)\.(\d+)\.(.*)", name)
    if match is None:
        return name  # stem and head are shared as they are
    block = int(match[2])
    return f"{match[1]}.{block if block < 2 else 4}.{match[3]}"


def _copy(src, src_opt, dst, dst_opt, names):
    """Weights, buffers and optimizer state from ``src`` to ``dst``; ``names``: src -> dst."""
    src_sd, dst_sd = src.state_dict(keep_vars=True), dst.state_dict(keep_vars=True)
    with torch.no_grad():
        for s, d in names.items():
            dst_sd[d].copy_(src_sd[s])
    src_params, dst_params = dict(src.named_parameters()), dict(dst.named_parameters())
    for s, d in names.items():
        if s not in src_params:
            continue  # a buffer: no optimizer state
        state = src_opt.state.get(src_params[s])
        if state:
            dst_opt.state[dst_params[d]] = {
                key: v.clone() if torch.is_tensor(v) else v for key, v in state.items()
            }
        else:
            dst_opt.state.pop(dst_params[d], None)


def naive_algorithm_1(base, motivated, opt_base, opt_motivated, data, epochs, k):
    """Algorithm 1 of the paper, line by line; returns per epoch the steps each model ran."""
    small_big = {name: _depth_map(name) for name in base.state_dict()}
    big_small = {d: s for s, d in small_big.items()}
    motivated_flag, prev_loss, consecutive_improve = False, math.inf, 0
    counts = []
    for epoch in range(epochs):
        n_base = n_motivated = 0
        for inputs, targets in data.train_batches(epoch):
            if not motivated_flag:
                outputs = base.train()(inputs)
                n_base += 1
            else:
                outputs = motivated.train()(inputs)
                n_motivated += 1
            loss = F.cross_entropy(outputs, targets)
            loss.backward()
            optimizer = opt_motivated if motivated_flag else opt_base
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if loss.item() < prev_loss:
                consecutive_improve += 1
            else:
                consecutive_improve = 0
            if consecutive_improve >= k:
                if not motivated_flag:
                    motivated_flag = True
                    _copy(base, opt_base, motivated, opt_motivated, small_big)
            elif motivated_flag:
                motivated_flag = False
                _copy(motivated, opt_motivated, base, opt_base, big_small)
            prev_loss = loss.item()
        if motivated_flag:
            motivated_flag = False
            _copy(motivated, opt_motivated, base, opt_base, big_small)
        counts.append({"base_steps": n_base, "motivated_steps": n_motivated})
    return counts


@pytest.mark.parametrize(
    "optim",
    [
        ["optim.name=momentum", "optim.momentum=0.9", "optim.weight_decay=5e-4"],
        ["optim.name=adamw", "optim.lr=2e-3", "optim.weight_decay=0.05"],
    ],
    ids=["sgd-momentum", "adamw"],
)
def test_library_equals_a_plain_algorithm_1(tmp_path, optim):
    cfg = _cfg("epochs=3", "motivation.k=1", "sched.name=none", *optim)
    trainer = Trainer(cfg, tmp_path / "run")
    base = copy.deepcopy(trainer.model)
    motivated = copy.deepcopy(trainer.method.motivated_model)
    opt_base, opt_motivated = build_optimizer(cfg, base), build_optimizer(cfg, motivated)
    trainer.fit(progress=False)

    counts = naive_algorithm_1(base, motivated, opt_base, opt_motivated, trainer.data, 3, k=1)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [{k: r[k] for k in ("base_steps", "motivated_steps")} for r in lines] == counts
    # Both models took steps, and some motivated state ended before its epoch did.
    assert sum(c["motivated_steps"] for c in counts) > 0
    assert sum(r["switches"] for r in lines) > len(lines)
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, base.state_dict()[name]), name
    for name, tensor in trainer.method.motivated_model.state_dict().items():
        assert torch.equal(tensor, motivated.state_dict()[name]), name


# ------------------------------------------------------------------- the switch rules directly
class _Always(Condition):
    """A condition that always asks for the motivated model."""

    name = "always"

    def update(self, loss: float, **extra: float) -> bool:
        return True

    def state_dict(self) -> dict:
        return {"name": self.name}

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state, ())


def _resnet_pair():
    torch.manual_seed(0)
    return (
        nt.create_model("resnet20", num_classes=10, in_chans=1),
        nt.create_model("resnet32", num_classes=10, in_chans=1),
    )


def _vit_pair():
    torch.manual_seed(0)
    kwargs = dict(num_classes=10, in_chans=1, img_size=8, patch_size=4, depth=2)
    return (
        nt.create_model("vit_tiny_patch16_224", embed_dim=32, num_heads=2, **kwargs),
        nt.create_model("vit_tiny_patch16_224", embed_dim=64, num_heads=4, **kwargs),
    )


def _differential_state(optimizer, model, masks):
    """The optimizer state of the differential weights: the masked part of state shaped like
    its parameter, and any other state of wholly differential parameters."""
    snapshot = {}
    for name, p in model.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value) and value.shape == p.shape:
                snapshot[name, key] = value[masks[name]].clone()
            elif masks[name].all():
                snapshot[name, key] = torch.as_tensor(value).clone()
    return snapshot


def _state_moved(before, after):
    # State created at a switch starts at zero where the base has no counterpart.
    created = [v for key, v in after.items() if key not in before]
    return (
        any(key not in after for key in before)
        or any(not torch.equal(v, after[key]) for key, v in before.items())
        or any(v.count_nonzero() for v in created)
    )


@pytest.mark.parametrize(
    "pair, make_opt",
    [
        (_resnet_pair, lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)),
        (_vit_pair, lambda m: torch.optim.AdamW(m.parameters(), lr=2e-3)),
    ],
    ids=["resnet20-32-sgd", "vit-width-adamw"],
)
def test_differential_weights_and_state_move_only_in_motivated_steps(digits, pair, make_opt):
    base, motivated = pair()
    opt_base, opt_motivated = make_opt(base), make_opt(motivated)
    method = MotivationTraining(base, motivated, opt_base, opt_motivated, LossDecrease(1))
    masks = method.weight_map.differential(motivated)
    assert any(m.any() for m in masks.values())
    names = [n for n, _ in motivated.named_parameters() if masks[n].any()]
    moved_when = {"base": [], "motivated": []}
    for epoch in range(2):
        for images, labels in digits.train_batches(epoch):
            before = {n: t.detach().clone() for n, t in motivated.state_dict().items()}
            state_before = _differential_state(opt_motivated, motivated, masks)
            info = method.step(images, labels)
            method.optimizer.step()
            method.optimizer.zero_grad(set_to_none=True)
            method.after_optimizer_step(info)
            after = motivated.state_dict()
            moved = any(not torch.equal(before[n][masks[n]], after[n][masks[n]]) for n in masks)
            state_after = _differential_state(opt_motivated, motivated, masks)
            moved_when[info["model"]].append(moved or _state_moved(state_before, state_after))
        method.on_epoch_end(epoch)
    assert names and moved_when["base"] and moved_when["motivated"]
    assert not any(moved_when["base"])  # differential weights and state keep still
    assert all(moved_when["motivated"])  # and they do train while motivated


def test_every_epoch_ends_and_starts_on_the_base_model(digits):
    base, motivated = _resnet_pair()
    opt_base = torch.optim.SGD(base.parameters(), lr=0.05, momentum=0.9)
    opt_motivated = torch.optim.SGD(motivated.parameters(), lr=0.05, momentum=0.9)
    method = MotivationTraining(base, motivated, opt_base, opt_motivated, _Always())
    steps = digits.steps_per_epoch
    for epoch in range(2):
        ran = []
        for images, labels in digits.train_batches(epoch):
            info = method.step(images, labels)
            method.optimizer.step()
            method.optimizer.zero_grad(set_to_none=True)
            method.after_optimizer_step(info)
            ran.append(info["model"])
        assert method.motivated and method.model is motivated
        method.on_epoch_end(epoch)
        assert not method.motivated and method.model is base and method.optimizer is opt_base
        assert ran == ["base"] + ["motivated"] * (steps - 1)
        assert method.epoch_metrics() == {
            "motivated_steps": steps - 1,
            "base_steps": 1,
            "switches": 1,
            "motivated_share": (steps - 1) / steps,
        }
        # The forced switch copied the motivated model's base slices back, state included.
        motivated_sd = motivated.state_dict()
        for name, tmap in method.weight_map.tensors.items():
            assert torch.equal(base.state_dict()[name], motivated_sd[tmap.motivated_name]), name
        for name, p in base.named_parameters():
            q = motivated.get_parameter(method.weight_map.tensors[name].motivated_name)
            assert torch.equal(
                opt_base.state[p]["momentum_buffer"], opt_motivated.state[q]["momentum_buffer"]
            )


def test_optimizers_of_different_classes_are_refused():
    base, motivated = _resnet_pair()
    with pytest.raises(ValueError, match="SGD and AdamW"):
        MotivationTraining(
            base,
            motivated,
            torch.optim.SGD(base.parameters(), lr=0.1),
            torch.optim.AdamW(motivated.parameters()),
            LossDecrease(2),
        )


# ------------------------------------------------------------------------------ the trainer
def test_resume_ends_where_an_uninterrupted_run_would(tmp_path, monkeypatch):
    overrides = ("epochs=2", "motivation.k=1", "data.hflip=0.5")
    straight = Trainer(_cfg(*overrides), tmp_path / "straight")
    straight.fit(progress=False)
    # The schedule drives the base optimizer; the motivated one follows it.
    lead, follower = straight.method.optimizers
    assert [g["lr"] for g in follower.param_groups] == [g["lr"] for g in lead.param_groups]
    assert follower.param_groups[0]["lr"] != straight.cfg.optim.lr

    crash_after_first_epoch_then_resume(monkeypatch, lambda: _cfg(*overrides), tmp_path / "resumed")

    for weights in ("weights.pt", "base.pt", "motivated.pt"):
        a = torch.load(tmp_path / "straight" / weights)
        b = torch.load(tmp_path / "resumed" / weights)
        assert all(torch.equal(a[k], b[k]) for k in a), weights

    def read(run, name):
        return (tmp_path / run / name).read_text()

    keys = ("epoch", "motivated_steps", "base_steps", "switches", "loss")
    lines = {
        run: [{k: json.loads(x)[k] for k in keys} for x in read(run, "metrics.jsonl").splitlines()]
        for run in ("straight", "resumed")
    }
    assert lines["straight"] == lines["resumed"]
    summaries = {run: json.loads(read(run, "summary.json")) for run in ("straight", "resumed")}
    for key in ("flops_per_image", "motivated_steps", "base_steps", "switches", "motivated_acc"):
        assert summaries["straight"][key] == summaries["resumed"][key], key


@pytest.mark.parametrize("condition", ["ema", "val_loss", "grad_slope", "random_a"])
def test_every_condition_trains(tmp_path, condition):
    extra = ["motivation.ema_threshold=0"] if condition == "ema" else []
    summary = nt.train(
        _cfg("epochs=2", f"motivation.condition={condition}", "motivation.k=1", *extra),
        tmp_path / "run",
    )
    assert summary["condition"] == condition
    assert summary["base_steps"] + summary["motivated_steps"] == 2 * 6
    assert summary["base_steps"] >= 2  # every epoch starts on the base model


def test_random_b_replays_an_earlier_runs_counts(tmp_path):
    nt.train(_cfg("epochs=2", "motivation.k=1"), tmp_path / "source")
    metrics = tmp_path / "source" / "metrics.jsonl"
    source = [json.loads(x)["motivated_steps"] for x in metrics.read_text().splitlines()]
    assert sum(source) > 0
    nt.train(
        _cfg("epochs=2", "motivation.condition=random_b", f"motivation.counts_from=[{metrics}]"),
        tmp_path / "replay",
    )
    replay = (tmp_path / "replay" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["motivated_steps"] for x in replay] == source


def test_cli_run_writes_both_models(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", str(DIGITS), "epochs=2", "data.train_subset=192", "batch_size=32"]
    assert main([*argv, "--out", str(out)]) == 0
    for file, name in (("base.pt", "resnet20"), ("motivated.pt", "resnet32")):
        model = nt.create_model(name, num_classes=10, in_chans=1)
        model.load_state_dict(torch.load(out / file, weights_only=True))  # strict
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        for key in ("motivated_steps", "base_steps", "switches", "base_acc", "motivated_acc"):
            assert key in line, key
        assert "motivated_acc_raw" in line
        assert line["motivated_steps"] + line["base_steps"] == 6
        assert line["motivated_share"] == pytest.approx(line["motivated_steps"] / 6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base_acc"] == lines[-1]["base_acc"] == summary["main_acc"]
    assert summary["motivated_acc"] == lines[-1]["motivated_acc"]
    assert summary["motivated_acc_raw"] == lines[-1]["motivated_acc_raw"]
    assert summary["flops_base"] < summary["flops_motivated"]
    n_base, n_mot = summary["base_steps"], summary["motivated_steps"]
    assert n_base == sum(r["base_steps"] for r in lines)
    expected = (n_base * summary["flops_base"] + n_mot * summary["flops_motivated"]) / (
        n_base + n_mot
    )
    assert summary["flops_per_image"] == pytest.approx(expected)


def test_motivated_model_is_evaluated_and_saved_with_its_own_bn_statistics(tmp_path):
    """The motivated model's BN buffers are the base model's: the run evaluates and saves it
    with statistics re-estimated from the calibration images, logs the raw accuracy beside,
    and trains exactly as with ``motivation.reestimate_bn=false``."""
    argv = ["train", str(DIGITS), "epochs=2", "data.train_subset=192", "batch_size=32"]
    argv += ["motivation.k=1", "model.kwargs.zero_init_last=false"]
    on, off = tmp_path / "on", tmp_path / "off"
    assert main([*argv, "--out", str(on)]) == 0
    assert main([*argv, "motivation.reestimate_bn=false", "--out", str(off)]) == 0
    losses = [
        [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
        for run in (on, off)
    ]
    assert losses[0] == losses[1]
    for file in ("base.pt", "weights.pt"):
        a, b = (torch.load(run / file, weights_only=True) for run in (on, off))
        assert all(torch.equal(a[k], b[k]) for k in a), file
    mot_on, mot_off = (torch.load(run / "motivated.pt", weights_only=True) for run in (on, off))
    stats = [k for k in mot_on if k.endswith(("running_mean", "running_var", "_tracked"))]
    assert all(torch.equal(mot_on[k], mot_off[k]) for k in mot_on if k not in stats)
    assert not all(torch.equal(mot_on[k], mot_off[k]) for k in stats)
    s_on, s_off = (json.loads((run / "summary.json").read_text()) for run in (on, off))
    assert s_on["motivated_acc_raw"] == s_off["motivated_acc"]
    assert "motivated_acc_raw" not in s_off
    # motivated.pt is the model the run evaluated
    cfg = nt.load_config(on / "config.yaml")
    data = build_data(cfg.data, batch_size=cfg.batch_size, seed=cfg.seed, device="cpu")
    model = nt.create_model("resnet32", num_classes=10, in_chans=1, zero_init_last=False)
    model.load_state_dict(mot_on)
    evaluated = evaluate(model, data.eval_batches("test", batch_size=cfg.eval.batch_size))
    assert evaluated["acc"] == pytest.approx(s_on["motivated_acc"])
    # the library call for one's own loop gives those statistics
    model.load_state_dict(mot_off)
    with nt.bn.recalibrated(model, data.calibration_batches(batch_size=512)) as recalibrated:
        assert all(torch.equal(recalibrated.state_dict()[k], mot_on[k]) for k in stats)
    assert all(torch.equal(model.state_dict()[k], mot_off[k]) for k in stats)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["motivation.model=null"], "needs motivation.model"),
        (["model.name=resnet32", "motivation.model=resnet20"], "deeper than the motivated"),
        (["motivation.model=resnet20"], "same architecture"),
        (["motivation.condition=boredom"], "motivation.condition='boredom'"),
        (["motivation.condition=val_loss", "data.val_size=0"], "data.val_size=0"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_run_folder(tmp_path, capsys, overrides, message):
    out = tmp_path / "run"
    assert main(["train", str(DIGITS), *overrides, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("nestedtrain: error:")
    assert message in err
    assert not out.exists()


@pytest.mark.slow
def test_two_process_gloo_ranks_switch_together(tmp_path):
    # Each rank sees different images, so only the all-reduced loss lets them agree on every
    # switch; DDP would otherwise mix the two models' gradients (or hang).
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch, torch.distributed as dist\n"
        "import nestedtrain as nt\n"
        "from nestedtrain.engine.trainer import Trainer\n"
        "trainer = Trainer(nt.load_config(sys.argv[2], sys.argv[3:]), sys.argv[1])\n"
        "trainer.fit(progress=False)\n"
        "torch.save({'base': trainer.model.state_dict(),\n"
        "            'motivated': trainer.method.motivated_model.state_dict()},\n"
        "           f'{sys.argv[1]}/rank{dist.get_rank()}.pt')\n"
    )
    out = tmp_path / "two"
    torchrun_two(
        script, str(out), str(DIGITS), *SMALL, "epochs=2", "motivation.k=1", "data.hflip=0.5"
    )
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    for model in ("base", "motivated"):
        # every weight, and the BN statistics, averaged over the ranks before each save
        differ = [k for k in r0[model] if not torch.equal(r0[model][k], r1[model][k])]
        assert not differ, differ
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["motivated_steps"] for r in lines) > 0


# ------------------------------------------------------------------------------ efficiency
def _summary(folder: Path, **values) -> Path:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(values))
    return folder


def test_efficiency_reproduces_table_1_cifar10_resnet20_32(tmp_path, capsys):
    # Table 1, CIFAR-10: Resnet-20-C 92.62, Res-20-32B 92.83 (2.18, ratio 1.24), Resnet-32-C
    # 93.63 (1.76); FLOPs from Table 8: 82.82M, 92.47M, 140.13M.
    run = _summary(
        tmp_path / "mot",
        method="motivation",
        model="resnet20",
        dataset="cifar10",
        base_acc=92.83,
        motivated_acc=93.10,
        flops_per_image=92.47e6,
    )
    x = _summary(
        tmp_path / "x",
        method="ct",
        model="resnet20",
        dataset="cifar10",
        main_acc=92.62,
        flops=82.82e6,
    )
    y = _summary(
        tmp_path / "y",
        method="ct",
        model="resnet32",
        dataset="cifar10",
        main_acc=93.63,
        flops=140.13e6,
    )
    report = efficiency([run], [x], [y])
    assert report["acc_flops_xyb"] * 1e8 == pytest.approx(2.18, rel=0.01)
    assert report["acc_flops_yc"] * 1e8 == pytest.approx(1.76, rel=0.01)
    assert report["ratio"] == pytest.approx(1.24, rel=0.01)

    argv = ["efficiency", "--run", str(run), "--base-classical", str(x)]
    assert main([*argv, "--motivated-classical", str(y)]) == 0
    out = capsys.readouterr().out
    b_row = next(line for line in out.splitlines() if "(B)" in line)
    printed = [float(v) for v in re.findall(r"\d+\.\d+", b_row)]
    assert printed[-2] == pytest.approx(2.18, rel=0.01)  # ACC/FLOPs in 1e-2 %/MFLOP
    assert printed[-1] == pytest.approx(1.24, rel=0.01)  # its ratio
    c_row = next(line for line in out.splitlines() if line.strip().startswith("resnet32 (C)"))
    assert float(re.findall(r"\d+\.\d+", c_row)[-1]) == pytest.approx(1.76, rel=0.01)

    # A classical run that is not classical, and a missing summary, are refused.
    assert main([*argv, "--motivated-classical", str(run)]) == 2
    assert "method='ct'" in capsys.readouterr().err
    assert main([*argv, "--motivated-classical", str(tmp_path / "none")]) == 2
    assert "no summary.json" in capsys.readouterr().err


def test_efficiency_averages_runs_and_checks_the_models(tmp_path):
    common = dict(method="motivation", model="resnet20", motivated_acc=1.0)
    runs = [
        _summary(tmp_path / "a", base_acc=92.73, flops_per_image=92.0e6, **common),
        _summary(tmp_path / "b", base_acc=92.93, flops_per_image=92.94e6, **common),
    ]
    x = _summary(tmp_path / "x", model="resnet20", main_acc=92.62, flops=82.82e6)
    y = _summary(tmp_path / "y", model="resnet32", main_acc=93.63, flops=140.13e6)
    report = efficiency(runs, [x], [y])
    assert report["acc_xyb"][0] == pytest.approx(92.83)
    assert report["flops_xy"] == pytest.approx(92.47e6)
    assert report["ratio"] == pytest.approx(1.2348, rel=1e-3)
    wrong = _summary(tmp_path / "w", model="resnet44", main_acc=92.62, flops=82.82e6)
    with pytest.raises(ValueError, match="base model X"):
        efficiency(runs, [wrong], [y])


# ---------------------------------------------------------------------------------- tune-k
def test_k_fold_split_partitions_the_training_set():
    folds = [split_train(100, 0.0, None, seed=3, num_folds=3, fold=f) for f in range(3)]
    vals = [set(val.tolist()) for _, val in folds]
    assert [len(v) for v in vals] == [33, 33, 34]
    assert set().union(*vals) == set(range(100)) and sum(len(v) for v in vals) == 100
    for train, val in folds:
        assert set(train.tolist()) == set(range(100)) - set(val.tolist())
    # the training subset is drawn from the other folds only
    train, val = split_train(100, 0.0, 20, seed=3, num_folds=3, fold=1)
    assert len(train) == 20 and not set(train.tolist()) & set(val.tolist())
    # without folds, the split is the seeded val_size split as before
    train, val = split_train(100, 0.1, None, seed=3)
    assert len(val) == 10 and len(train) == 90

    data = build_data(
        DataConfig(num_folds=4, fold=3, val_size=0), batch_size=32, seed=0, device="cpu"
    )
    assert data.n_val + data.n_train == 1437 and data.n_val == 1437 - 1437 * 3 // 4
    for cfg, message in [
        (DataConfig(num_folds=4, fold=0), "data.val_size=0.1"),
        (DataConfig(num_folds=2, fold=2, val_size=0), "data.fold=2"),
        (DataConfig(num_folds=1, val_size=0), "data.num_folds=1"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            build_data(cfg, batch_size=32, seed=0, device="cpu")


def test_tune_k_cross_validates_and_prints_the_best_k(tmp_path, capsys):
    out = tmp_path / "tune"
    argv = ["tune-k", str(DIGITS), "epochs=1", "data.train_subset=96", "batch_size=32"]
    assert main([*argv, "--folds", "2", "--k", "1,2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    best = re.search(r"best k: (\d+)", printed)
    assert best is not None and int(best[1]) in (1, 2)
    report = json.loads((out / "tune_k.json").read_text())
    assert [(r["k"], r["fold"]) for r in report["results"]] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert report["best_k"] == int(best[1])
    per_k = {r["k"]: r["base_val_acc"] for r in report["per_k"]}
    assert all(r["motivated_val_acc_raw"] is not None for r in report["per_k"])
    assert per_k[report["best_k"]] == max(per_k.values())
    for r in report["results"]:  # each fold is held out: about half of digits' 1,437 images
        config = nt.load_config(out / f"k{r['k']}" / f"fold{r['fold']}" / "config.yaml")
        assert (config.motivation.k, config.data.fold, config.data.num_folds) == (
            r["k"],
            r["fold"],
            2,
        )
    # a second call into the same folder, and a random condition, are refused
    assert main([*argv, "--folds", "2", "--k", "1", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    random = [*argv, "motivation.condition=random_a", "--out", str(tmp_path / "r")]
    assert main(random) == 2
    assert "does not use k" in capsys.readouterr().err
    assert main([*argv, "--k", "1,x", "--out", str(tmp_path / "x")]) == 2


# --------------------------------------------------------------------------------- recipes
RECIPE_FILES = sorted(RECIPES.glob("motivation_*.yaml"))


def test_there_is_a_recipe_for_each_paper_setting():
    names = {p.stem for p in RECIPE_FILES}
    assert {
        "motivation_cifar10_resnet20_32",
        "motivation_cifar10_vit_tiny_small",
        "motivation_cifar100_efficientnet_b0_b1",
        "motivation_imagenet_resnet50_101",
        "motivation_digits_resnet20_32",
        "motivation_fmnist_resnet20_32",
    } <= names


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.stem)
def test_recipe_loads_and_its_models_pair(path, tmp_path):
    assert path.read_text().startswith("# ")  # says which result it targets
    cfg = nt.load_config(path)
    assert cfg.method == "motivation" and cfg.motivation.model
    if cfg.data.name == "digits" or (
        cfg.data.name == "fashion-mnist" and FASHION_MNIST_SYSTEM_DIR.is_dir()
    ):
        trainer = Trainer(cfg, tmp_path / "run")
        assert isinstance(trainer.method, MotivationTraining)
        assert not (tmp_path / "run").exists()
        return
    # The data is not on this machine: check that the two models build and pair.
    base = build_model(cfg, 10, 3)
    motivated = build_motivated_model(cfg, 10, 3)
    assert WeightMap(base, motivated, qkv=cfg.motivation.qkv).unmatched == []


def test_motivated_model_takes_its_own_dropout():
    cfg = nt.load_config(
        None,
        [
            "method=motivation",
            "model.name=efficientnet_b0",
            "model.drop_rate=0.2",
            "motivation.model=efficientnet_b2",
            "motivation.drop_rate=0.3",
        ],
    )
    assert build_motivated_model(cfg, 10, 3).drop_rate == 0.3
    cfg.motivation.drop_rate = None
    assert build_motivated_model(cfg, 10, 3).drop_rate == 0.2
    assert build_model(cfg, 10, 3).drop_rate == 0.2
