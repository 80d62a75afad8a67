"""The trainer on digits: run folders, seeds, resume, initialisation, torchrun, recipes, EMA,
clipping, label smoothing, memory formats and stochastic depth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import crash_after_first_epoch_then_resume, perturb_norms, torchrun_two
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import nestedtrain as nt
from nestedtrain.cli import main
from nestedtrain.engine.trainer import Trainer

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SMALL = ["data.train_subset=256", "batch_size=64", "eval.subnets=sample:3", "optim.lr=0.05"]


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


def test_evaluating_between_epochs_leaves_training_unchanged(tmp_path):
    """Sub-network evaluation and BN re-estimation after epoch 1 (``eval.every=1``) draw
    sub-networks and images; the run must still train what ``eval.every=2`` trains."""
    overrides = ("method=stpp", "epochs=2", "eval.subnets=sample:3", "model.drop_path_rate=0.1")
    for every in (1, 2):
        nt.train(_cfg(*overrides, f"eval.every={every}"), tmp_path / str(every))
    each, once = (torch.load(tmp_path / str(e) / "weights.pt") for e in (1, 2))
    assert all(torch.equal(each[k], once[k]) for k in each)
    logged = (tmp_path / "1" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(logged[0]).get("subnets")  # epoch 1 was evaluated, sub-networks too


def test_resume_ends_where_an_uninterrupted_run_would(tmp_path, monkeypatch):
    overrides = ("method=st", "epochs=2", "eval.subnets=none", "data.hflip=0.5")
    nt.train(_cfg(*overrides), tmp_path / "straight")

    crash_after_first_epoch_then_resume(monkeypatch, lambda: _cfg(*overrides), tmp_path / "resumed")

    straight = torch.load(tmp_path / "straight" / "weights.pt")
    resumed = torch.load(tmp_path / "resumed" / "weights.pt")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1]


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
    two = tmp_path / "two"
    torchrun_two(script, str(two), *overrides)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
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


def test_ema_and_clipping_and_label_smoothing_run(tmp_path):
    trainer = Trainer(
        _cfg(
            "epochs=1",
            "ema=true",
            "ema_decay=0.9",
            "optim.clip_grad=0.2",
            "data.label_smoothing=0.1",
            "eval.subnets=none",
        ),
        tmp_path / "r",
    )
    model = trainer.model
    norms, averaged = [], {}

    def before_step(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    def after_step(optimizer, args, kwargs):
        # timm's EMA takes the first update's weights whole, then moves by 1 - decay
        for name, p in model.named_parameters():
            weights = p.detach().clone()
            averaged[name] = averaged[name].lerp(weights, 0.1) if name in averaged else weights

    hooks = [
        register_optimizer_step_pre_hook(before_step),
        register_optimizer_step_post_hook(after_step),
    ]
    try:
        summary = trainer.fit()
    finally:
        for hook in hooks:
            hook.remove()
    assert summary["ema_test_acc"] is not None
    state = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=False)
    assert state["ema"] is not None
    # clipping: no update steps with a gradient norm over 0.2, and some were cut down to it
    # (this run's gradient norms stay under 0.5: a clip at 1 would leave them all alone)
    assert len(norms) == trainer.data.steps_per_epoch
    assert max(norms) == pytest.approx(0.2, rel=1e-5)
    # EMA: the average of the weights after each update, with decay 0.9
    for name, p in trainer.ema.module.named_parameters():
        torch.testing.assert_close(p, averaged[name], rtol=1e-5, atol=1e-7)
    # label smoothing: the step's loss is CE with smoothing 0.1
    images, labels = next(iter(trainer.data.train_batches(0)))
    with torch.no_grad():
        expected = F.cross_entropy(model(images), labels, label_smoothing=0.1)
    assert float(trainer.method.step(images, labels)["ce"]) == pytest.approx(float(expected))


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
