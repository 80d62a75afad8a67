"""Method steps, the trainer, checkpoints, resume and torchrun on digits."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import perturb_norms

import nestedtrain as nt
from nestedtrain import atomic
from nestedtrain.cli import main
from nestedtrain.data import DataConfig, build_data
from nestedtrain.engine import checkpoint as ckpt_module
from nestedtrain.engine.trainer import Trainer

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SMALL = ["data.train_subset=256", "batch_size=64", "eval.subnets=sample:3", "optim.lr=0.05"]


@pytest.fixture(scope="module")
def digits():
    return build_data(DataConfig(crop="none"), batch_size=64, seed=0, device=torch.device("cpu"))


def _steps(method, data, epochs=3):
    losses = []
    for epoch in range(epochs):
        for images, labels in data.train_batches(epoch):
            info = method.step(images, labels)
            method.optimizer.step()
            method.optimizer.zero_grad(set_to_none=True)
            method.after_optimizer_step(info)
            losses.append(info)
        method.on_epoch_end(epoch)
    return losses


def _method(kind, **kwargs):
    torch.manual_seed(0)
    model = nt.create_model("resnet20", num_classes=10, in_chans=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if kind == "ct":
        return nt.CommonTraining(model, optimizer)
    return nt.StimulativeTraining(model, optimizer, **kwargs)


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("ct", {}),
        ("st", {"lam": 1.0}),
        ("stpp", {"kl_norm": "std", "norm_main_ce": True, "num_subnets": 3, "resize": (0.43, 1.0)}),
    ],
)
def test_each_method_lowers_the_loss(digits, kind, kwargs):
    infos = _steps(_method("ct" if kind == "ct" else "st", **kwargs), digits, epochs=3)
    first = sum(i["ce"] for i in infos[:4]) / 4
    last = sum(i["ce"] for i in infos[-4:]) / 4
    assert last < 0.7 * first, (first, last)
    if kind != "ct":
        assert all(len(i["subnets"]) == kwargs.get("num_subnets", 1) for i in infos)


def test_st_loss_is_ce_plus_lambda_kl(digits):
    images, labels = next(iter(digits.train_batches(0)))
    for lam, n in ((5.0, 1), (2.0, 3)):
        method = _method("st", lam=lam, num_subnets=n)
        perturb_norms(method.model)  # zero-init last BNs make every sub-network the main one
        info = method.step(images, labels)
        # loss terms stay tensors on the device: the step never waits for it
        assert all(isinstance(info[k], torch.Tensor) for k in ("loss", "ce", "kl"))
        loss, ce, kl = (float(info[k]) for k in ("loss", "ce", "kl"))
        assert kl > 0
        assert loss == pytest.approx(ce + lam * n * kl, rel=1e-6)


def test_n_subnets_mean_n_subnet_backwards(digits):
    images, labels = next(iter(digits.train_batches(0)))
    method = _method("st", num_subnets=4)
    backwards = []
    method.model.fc.weight.register_hook(lambda g: backwards.append(1))
    info = method.step(images, labels)
    assert len(backwards) == 1 + 4 and len(info["subnets"]) == 4


def test_lambda_zero_and_start_epoch_mean_plain_ce(digits):
    images, labels = next(iter(digits.train_batches(0)))
    method = _method("st", start_epoch=1)
    assert method.step(images, labels)["subnets"] == []
    method.on_epoch_end(0)
    assert len(method.step(images, labels)["subnets"]) == 1


def test_protect_leaves_main_bn_statistics_to_the_main_forward(digits):
    images, labels = next(iter(digits.train_batches(0)))
    protect = _method("st", num_subnets=3, bn="protect")
    reference = copy.deepcopy(protect.model)
    main_only = copy.deepcopy(protect.model).train()
    with torch.no_grad():
        main_only(images)  # what the main forward alone does to the statistics
    protect.step(images, labels)
    expected = nt.bn.save_stats(main_only)
    got = nt.bn.save_stats(protect.model)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    ref_method = nt.StimulativeTraining(
        reference, torch.optim.SGD(reference.parameters(), lr=0.1), num_subnets=3, bn="reference"
    )
    ref_method.step(images, labels)
    moved = nt.bn.save_stats(reference)
    assert not all(torch.equal(expected[k], moved[k]) for k in expected)
    assert ref_method.reestimates_main_bn and not protect.reestimates_main_bn


def test_st_label_target_and_validation():
    model = nt.create_model("resnet20", num_classes=10, in_chans=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for kwargs, message in [
        ({"lam": -1}, "st.lam=-1"),
        ({"kl_norm": "max"}, "st.kl_norm='max'"),
        ({"resize": (0.5, 1.5)}, r"st.resize=\[0.5, 1.5\]"),
        ({"target": "x"}, "st.target='x'"),
        ({"bn": "x"}, "st.bn='x'"),
    ]:
        with pytest.raises(ValueError, match=message):
            nt.StimulativeTraining(model, opt, **kwargs)
    vit = nt.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8)
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        nt.StimulativeTraining(vit, opt, resize=(0.5, 1.0))


# ------------------------------------------------------------------------------ the trainer


def _cfg(*overrides):
    return nt.load_config(None, [*SMALL, *overrides])


def test_run_folder_contents(tmp_path):
    out = tmp_path / "run"
    summary = nt.train(_cfg("method=st", "epochs=2"), out)
    assert {p.name for p in out.iterdir()} >= {
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "weights.pt",
        "checkpoints",
        "tensorboard",
    }
    assert (out / "checkpoints" / "last.pt").is_file() and (
        out / "checkpoints" / "best.pt"
    ).is_file()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1]
    for key in (
        "lr",
        "loss",
        "ce",
        "kl",
        "val_acc",
        "test_acc",
        "test_acc5",
        "subnets",
        "epoch_seconds",
        "images_per_second",
    ):
        assert key in lines[-1], key
    assert len(lines[-1]["subnets"]) == 3
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["main_acc"] == lines[-1]["test_acc"]
    assert on_disk["best_epoch"] in (0, 1)
    assert {"subnet", "acc", "flops", "params"} <= set(on_disk["subnets"][0])
    config_text = (out / "config.yaml").read_text()
    assert "# torch:" in config_text and "# timm:" in config_text
    assert nt.load_config(out / "config.yaml").method == "st"  # config.yaml is a recipe
    # weights.pt is a plain state_dict that timm loads
    import timm

    plain = timm.create_model("resnet20", num_classes=10, in_chans=1)
    plain.load_state_dict(torch.load(out / "weights.pt", weights_only=True))
    assert list(out.glob("**/*.tmp")) == []


def test_best_epoch_without_validation_is_the_last(tmp_path):
    summary = nt.train(_cfg("epochs=2", "data.val_size=0", "eval.subnets=none"), tmp_path / "r")
    assert summary["best_epoch"] == 1 and summary["best_val_acc"] is None


def test_same_seed_same_result(tmp_path):
    a = nt.train(_cfg("method=st", "epochs=1", "eval.subnets=none"), tmp_path / "a")
    b = nt.train(_cfg("method=st", "epochs=1", "eval.subnets=none"), tmp_path / "b")
    wa = torch.load(tmp_path / "a" / "weights.pt")
    wb = torch.load(tmp_path / "b" / "weights.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["main_acc"] == b["main_acc"]


def test_resume_ends_where_an_uninterrupted_run_would(tmp_path, monkeypatch):
    overrides = ("method=st", "epochs=2", "eval.subnets=none", "data.hflip=0.5")
    nt.train(_cfg(*overrides), tmp_path / "straight")

    original = Trainer._save

    def crash_after_first_epoch(self, epoch, is_best):
        original(self, epoch, is_best)
        if epoch == 0:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(Trainer, "_save", crash_after_first_epoch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        nt.train(_cfg(*overrides), tmp_path / "resumed")
    monkeypatch.setattr(Trainer, "_save", original)
    nt.train(_cfg(*overrides), tmp_path / "resumed", resume=True)

    straight = torch.load(tmp_path / "straight" / "weights.pt")
    resumed = torch.load(tmp_path / "resumed" / "weights.pt")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1]


def test_crash_between_temp_write_and_rename_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic.atomic_save({"format": ckpt_module.CHECKPOINT_FORMAT, "epoch": 1}, path)

    def crash(src, dst):
        raise OSError("disk pulled out")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="disk pulled out"):
        atomic.atomic_save({"format": ckpt_module.CHECKPOINT_FORMAT, "epoch": 2}, path)
    monkeypatch.undo()
    assert ckpt_module.load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_init_from_checkpoint_with_new_classifier(tmp_path):
    nt.train(_cfg("epochs=1", "eval.subnets=none"), tmp_path / "src")
    cfg = _cfg(
        "epochs=1", "eval.subnets=none", f"model.init_from={tmp_path / 'src' / 'weights.pt'}"
    )
    trainer = Trainer(cfg, tmp_path / "ft")
    source = torch.load(tmp_path / "src" / "weights.pt")
    assert torch.equal(trainer.model.conv1.weight, source["conv1.weight"])
    bad = _cfg("model.name=resnet32", f"model.init_from={tmp_path / 'src' / 'weights.pt'}")
    with pytest.raises(ValueError, match="does not fit CifarResNet"):
        Trainer(bad, tmp_path / "bad")
    # A whole checkpoint (RNG states and all, not a plain state_dict) works as well.
    last = tmp_path / "src" / "checkpoints" / "last.pt"
    trainer = Trainer(_cfg("epochs=1", f"model.init_from={last}"), tmp_path / "ft2")
    assert torch.equal(trainer.model.conv1.weight, source["conv1.weight"])


# ---------------------------------------------------------------------------------- torchrun

_DIST_SCRIPT = """
import sys, torch, torch.distributed as dist
import nestedtrain as nt
from nestedtrain.engine.trainer import Trainer
cfg = nt.load_config(None, sys.argv[2:])
trainer = Trainer(cfg, sys.argv[1])
trainer.fit(progress=False)
torch.save(trainer.model.state_dict(), f"{sys.argv[1]}/rank{dist.get_rank() if dist.is_initialized() else 0}.pt")
"""


@pytest.mark.slow
def test_two_process_gloo_matches_one_process(tmp_path):
    # A model without BatchNorm and no augmentation: 2 ranks x 32 images then see exactly
    # the 64-image global batch of the 1-process run, so only float summation order differs.
    overrides = [
        "method=st",
        "st.num_subnets=2",
        "model.name=vit_tiny_patch16_224",
        "model.kwargs={img_size: 8, patch_size: 4, depth: 4}",
        "data.train_subset=256",
        "data.crop=none",
        "data.hflip=0",
        "batch_size=64",
        "epochs=2",
        "optim.name=adamw",
        "optim.lr=1e-3",
        "optim.weight_decay=0.05",
        "eval.subnets=sample:2",
    ]
    script = tmp_path / "run.py"
    script.write_text(_DIST_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",  # a free port on localhost, chosen by torchrun
            str(script),
            str(two),
            *overrides,
        ],
        check=True,
        env=env,
        timeout=300,
    )
    one = tmp_path / "one"
    subprocess.run(
        [sys.executable, str(script), str(one), *overrides], check=True, env=env, timeout=300
    )
    r0, r1 = torch.load(two / "rank0.pt"), torch.load(two / "rank1.pt")
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "ranks ended with different weights"
    single = torch.load(one / "rank0.pt")
    # AdamW moves a weight by up to lr (1e-3) per step whatever its gradient's size, so
    # near-zero gradients summed in another order can differ by ~1e-4 after 8 steps; a wrong
    # all-reduce (a missing or doubled gradient) moves weights by ~1e-3 and more.
    for k in r0:
        torch.testing.assert_close(r0[k], single[k], rtol=1e-3, atol=3e-4)
    losses_two = [json.loads(x)["loss"] for x in (two / "metrics.jsonl").read_text().splitlines()]
    losses_one = [json.loads(x)["loss"] for x in (one / "metrics.jsonl").read_text().splitlines()]
    assert losses_two == pytest.approx(losses_one, rel=1e-4)
    assert not (two / "rank1").exists()
    # The ST step computed the shared prefixes once and all-reduced the gradients itself.
    for run in (one, two):
        summary = json.loads((run / "summary.json").read_text())
        assert summary["st_shared_prefix"].startswith("on:"), summary["st_shared_prefix"]


def test_every_recipe_loads_and_cpu_recipes_build(tmp_path):
    recipes = sorted(Path(__file__).resolve().parent.parent.glob("recipes/*.yaml"))
    assert len(recipes) >= 13
    for path in recipes:
        cfg = nt.load_config(path)
        assert path.read_text().startswith("#"), f"{path.name} says nothing about its target"
        if cfg.data.name == "digits":
            Trainer(nt.load_config(path, ["epochs=1"]), tmp_path / path.stem)
    stpp = nt.load_config(Path(recipes[0]).parent / "stpp_imagenet_resnet50_a1.yaml")
    assert (stpp.st.num_subnets, stpp.st.space, stpp.st.kl_norm) == (6, "space3", "std")
    assert list(stpp.st.resize) == [0.43, 1.0] and stpp.st.norm_main_ce


def test_evaluate_subnets_restores_main_bn_and_mode(digits):
    from oracle import evaluate_one_at_a_time

    from nestedtrain.engine.evaluate import select_subnets

    model = nt.create_model("resnet20", num_classes=10, in_chans=1)
    model.train()(next(iter(digits.calibration_batches())))  # give BN non-default statistics
    before = nt.bn.save_stats(model)
    subnets = select_subnets(model, "sample:3")
    results = evaluate_one_at_a_time(
        model, subnets, lambda: digits.eval_batches("test"), digits.calibration_batches
    )
    assert [r["subnet"] for r in results] == [str(s) for s in subnets] and len(results) == 3
    after = nt.bn.save_stats(model)
    assert all(torch.equal(before[k], after[k]) for k in before) and model.training
    # each sub-network's accuracy is the one of its export with freshly calibrated BN
    exported = nt.export_subnet(model, subnets[-1])
    nt.bn.recalibrate(exported, digits.calibration_batches())
    from nestedtrain.engine.evaluate import evaluate

    assert evaluate(exported, digits.eval_batches("test"))["acc"] == results[-1]["acc"]


def test_ema_and_clipping_and_label_smoothing_run(tmp_path):
    summary = nt.train(
        _cfg(
            "epochs=1",
            "ema=true",
            "ema_decay=0.9",
            "optim.clip_grad=1.0",
            "data.label_smoothing=0.1",
            "eval.subnets=none",
        ),
        tmp_path / "r",
    )
    assert summary["ema_test_acc"] is not None
    state = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=False)
    assert state["ema"] is not None


def test_the_recipe_schema_and_the_builders_know_the_same_methods():
    from nestedtrain.engine import METHODS, config

    assert METHODS is config.METHODS  # the one list: the builders dispatch on its names
    with pytest.raises(ValueError, match="unknown method 'sst': use one of ct, st, stpp"):
        nt.load_config(None, ["method=sst"])


@pytest.mark.parametrize("channels_last", [True, False])
def test_evaluation_inputs_take_the_training_memory_format(tmp_path, monkeypatch, channels_last):
    """channels_last applies on CUDA only: a stand-in for ``input_memory_format`` asks for it
    on the CPU, where the images (3 channels, so the format shows in the strides) of the
    training steps, the evaluation and the BN calibration must all follow it."""
    from test_data import write_image_tree

    from nestedtrain.engine import build, epoch_eval, loop

    def on_any_device(device: torch.device, on: bool) -> torch.memory_format:
        return torch.channels_last if on else torch.contiguous_format

    for module in (build, loop, epoch_eval):  # its users: the model, the steps, evaluation
        monkeypatch.setattr(module, "input_memory_format", on_any_device)
    write_image_tree(tmp_path / "images", {"train": 8, "val": 4}, size=12)
    folder = ["data.name=imagefolder", f"data.root={tmp_path / 'images'}", "data.img_size=8"]
    cfg = nt.load_config(
        None,
        [*folder, "data.val_size=0", "data.num_workers=0", "model.name=resnet20", "method=st"]
        + ["batch_size=8", "epochs=1", "eval.subnets=sample:2", f"channels_last={channels_last}"],
    )
    trainer = Trainer(cfg, tmp_path / "run")
    seen = []  # (training, channels-last) of every input the stem convolution takes
    hook = trainer.model.conv1.register_forward_pre_hook(
        lambda m, args: seen.append((trainer.model.training, args[0].stride(1) == 1))
    )
    finish = trainer._finish

    def finish_unhooked(record):
        hook.remove()  # the summary's FLOPs count forwards a blank image, no data
        return finish(record)

    trainer._finish = finish_unhooked
    trainer.fit(progress=False)
    assert {training for training, _ in seen} == {True, False}  # steps and evaluation
    assert all(last == channels_last for _, last in seen)


def test_stochastic_depth_in_our_resnets_through_st_and_its_shared_step(tmp_path, one_thread):
    """``model.drop_path_rate``: timm's DropPath on each residual branch, rate rising linearly
    with depth, drawn in training and off in evaluation; ST's shared step runs with it."""
    model = perturb_norms(nt.create_model("resnet20", num_classes=10, drop_path_rate=0.3))
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in _blocks(model)]
    assert rates == pytest.approx([0.3 * j / 8 for j in range(9)])
    x = torch.randn(4, 3, 16, 16)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    out = tmp_path / "run"
    argv = ["train", str(RECIPES / "digits_st.yaml"), "model.drop_path_rate=0.2", "epochs=1"]
    argv += ["data.train_subset=256", "eval.subnets=sample:2", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["st_shared_prefix"].startswith("on: ")
    plain = nt.create_model("resnet32", num_classes=10, in_chans=1)
    plain.load_state_dict(torch.load(out / "weights.pt", weights_only=True))  # same names


def _blocks(model):
    return [block for stage in (model.layer1, model.layer2, model.layer3) for block in stage]
