"""Models trained elsewhere: torchvision and timm weights files as those libraries write them,
our CIFAR ResNets' weights.pt, opened with --model/--weights/--data by the analyses; the
lesion analysis checked against one lesioned network evaluated at a time."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.utils
import torch
import torchvision
from oracle import evaluate_one_at_a_time
from PIL import Image

import nestedtrain as nt
from nestedtrain.analysis.lesion import lesion_subnet, lesionable_blocks
from nestedtrain.cli import main
from nestedtrain.cli.opening import open_foreign
from nestedtrain.elastic.stages import find_stages

pytestmark = pytest.mark.usefixtures("one_thread")

SIDE = 32  # images of the folder; the models see them at this side


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An ImageFolder tree in the real format: train/ and val/ of two classes of JPEGs,
    each class a different colour so that a model can tell them apart."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 8)):
        for c, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 120, (40, 48, 3), dtype=np.uint8)
                pixels[..., c] += 120
                Image.fromarray(pixels).save(root / split / name / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def torchvision_weights(tmp_path_factory) -> Path:
    """torchvision's resnet18 from a seeded init, saved as its hub files are: a state_dict."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=2)
    path = tmp_path_factory.mktemp("tv") / "resnet18-seeded.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory) -> Path:
    """timm's resnet18 from a seeded init, saved by timm's own CheckpointSaver as its
    train.py does: state_dict, optimizer, argparse args, EMA weights."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=2)
    ema = timm.utils.ModelEmaV3(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    folder = tmp_path_factory.mktemp("timm")
    args = argparse.Namespace(model="resnet18", lr=0.1)
    saver = timm.utils.CheckpointSaver(
        model, optimizer, args=args, model_ema=ema, checkpoint_dir=str(folder), max_history=1
    )
    saver.save_checkpoint(epoch=0, metric=50.0)
    return folder / "last.pth.tar"


def lesion_cli(tmp: Path, *words: str) -> dict:
    out = tmp / "out"
    code = main(
        ["analyze", "lesion", *words, "--k", "1,2", "--random", "2", "--device", "cpu"]
        + ["--batch-size", "4", "--calib-images", "8", "--out", str(out)]
    )
    assert code == 0
    return json.loads((out / "analysis" / "lesion" / "lesion.json").read_text())


def opened(
    model: str, weights: Path, data: str, input_size: int | None = SIDE, calib: str | None = None
):
    args = argparse.Namespace(
        model=model,
        weights=str(weights),
        pretrained=False,
        data=data,
        input_size=input_size,
        mean=None,
        std=None,
        calib=calib,
        out=None,
        data_root=None,
    )
    return open_foreign(args, torch.device("cpu"))


def first_fitting(stages, order, k: int) -> list[list[int]]:
    """The first k blocks of ``order`` whose deletion leaves every stage a block."""
    chosen: list[list[int]] = []
    for s, b in order:
        if len(chosen) < k and sum(c[0] == s for c in chosen) + 1 < len(stages[s]):
            chosen.append([s, b])
    return chosen


def check_against_oracle(result: dict, ckpt, split: str = "test") -> None:
    """Every number of the lesion JSON equals that network evaluated alone."""
    stages = find_stages(ckpt.model)
    blocks = lesionable_blocks(stages)
    eval_fn = lambda: ckpt.data.eval_batches(split, batch_size=4)  # noqa: E731
    calib_fn = lambda: ckpt.data.calibration_batches(num_images=8, batch_size=4)  # noqa: E731
    for policy, calib in (("own", None), ("recalibrate", calib_fn)):
        nets = [lesion_subnet(stages, [])] + [lesion_subnet(stages, [b]) for b in blocks]
        for curve in result["curves"][policy]:
            nets += [
                lesion_subnet(stages, [tuple(b) for b in curve[o]["deleted"]])
                for o in ("worst", "best")
            ]
        accs = [r["acc"] for r in evaluate_one_at_a_time(ckpt.model, nets, eval_fn, calib)]
        assert result["intact"][policy] == pytest.approx(accs[0], abs=1e-9)
        singles = [row[policy]["acc"] for row in result["blocks"]]
        assert singles == pytest.approx(accs[1 : 1 + len(blocks)], abs=1e-9)
        # worst k: the k blocks whose single deletion costs most that can go together
        harm = [b for _, b in sorted(zip(singles, blocks))]
        for curve in result["curves"][policy]:
            k = curve["k"]
            assert curve["worst"]["deleted"] == first_fitting(stages, harm, k)
            assert curve["best"]["deleted"] == first_fitting(stages, harm[::-1], k)
        ranked = [c[o]["acc"] for c in result["curves"][policy] for o in ("worst", "best")]
        assert ranked == pytest.approx(accs[1 + len(blocks) :], abs=1e-9)


def test_torchvision_state_dict_lesion_matches_the_oracle(tmp_path, folder, torchvision_weights):
    words = ["--model", "torchvision:resnet18", "--weights", str(torchvision_weights)]
    data = f"imagefolder:{folder}"
    result = lesion_cli(tmp_path, *words, "--data", data, "--input-size", str(SIDE))
    # resnet18: both blocks of layer1, the second of layer2..4
    blocks = [(r["stage"], r["block"]) for r in result["blocks"]]
    assert blocks == [
        (1, 0),
        (1, 1),
        (2, 1),
        (3, 1),
        (4, 1),
    ]
    assert result["weights"] == "foreign" and result["model"] == "torchvision:resnet18"
    assert "--weights" in result["command"] and result["dataset"] == "imagefolder"
    # torchvision initialises no branch to zero: every block changes what flows through it
    assert all(r["norm_ratio"] > 0.01 for r in result["blocks"])
    ckpt = opened("torchvision:resnet18", torchvision_weights, data)
    check_against_oracle(result, ckpt)
    # worst k deletes the blocks whose single deletion costs most
    own = sorted(result["blocks"], key=lambda r: (r["own"]["acc"], r["stage"], r["block"]))
    worst = result["curves"]["own"][0]["worst"]["deleted"]
    assert worst == [[own[0]["stage"] - 1, own[0]["block"]]]
    assert (tmp_path / "out" / "analysis" / "lesion" / "lesion.png").stat().st_size > 10_000
    # the same file opens as timm's resnet18, whose parameters are named alike
    again = lesion_cli(
        tmp_path / "timm",
        "--model",
        "resnet18",
        "--weights",
        str(torchvision_weights),
        "--data",
        data,
        "--input-size",
        str(SIDE),
    )
    assert [(r["stage"], r["block"]) for r in again["blocks"]] == blocks
    timm_model = opened("resnet18", torchvision_weights, data).model
    for (key, tensor), (other, theirs) in zip(
        timm_model.state_dict().items(), ckpt.model.state_dict().items()
    ):
        assert key == other and torch.equal(tensor, theirs)


def test_timm_training_checkpoint(tmp_path, folder, timm_checkpoint):
    data = f"imagefolder:{folder}"
    words = ["--model", "resnet18", "--weights", str(timm_checkpoint), "--data", data]
    result = lesion_cli(tmp_path, *words, "--input-size", str(SIDE))
    # timm zero-initialises each block's last BN: at init every block passes its input on
    assert all(r["norm_ratio"] == 0 for r in result["blocks"])
    assert all(r["own"]["drop"] == 0 for r in result["blocks"])
    ckpt = opened("resnet18", timm_checkpoint, data)
    check_against_oracle(result, ckpt)
    # timm's pretrained config gave the crop and normalisation, and the size without --input-size
    assert ckpt.cfg.data.test_crop_pct == 0.95 and ckpt.data.mean == (0.485, 0.456, 0.406)
    assert opened("resnet18", timm_checkpoint, data, input_size=None).data.test_img_size == 224


def test_our_weights_pt_and_a_module_prefix(tmp_path):
    torch.manual_seed(0)
    model = nt.create_model("resnet20", num_classes=10, in_chans=1)
    for m in model.modules():  # trained-looking BN, so that blocks do work
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    plain = tmp_path / "weights.pt"
    torch.save(model.state_dict(), plain)
    wrapped = tmp_path / "ddp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, wrapped)
    words = ["--model", "resnet20", "--data", "digits", "--split", "val"]
    result = lesion_cli(tmp_path / "plain", *words, "--weights", str(plain))
    assert len(result["blocks"]) == 3 + 2 + 2  # stage 1: all three; 2 and 3: the last two
    ckpt = opened("resnet20", plain, "digits", input_size=None)
    check_against_oracle(result, ckpt, split="val")
    own = lesion_cli(tmp_path / "ddp", *words, "--weights", str(wrapped), "--bn", "own")
    assert [r["own"] for r in own["blocks"]] == [r["own"] for r in result["blocks"]]


def test_recipe_data_other_analyses_and_report(tmp_path):
    torch.manual_seed(1)
    model = nt.create_model("resnet20", num_classes=10, in_chans=1)
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "analysis"
    common = ["--model", "resnet20", "--weights", str(weights), "--data", "recipes/digits_ct.yaml"]
    common += ["--device", "cpu", "--calib-images", "32", "--out", str(out)]
    assert main(["analyze", "subnets", *common, "--space", "1"]) == 0
    assert main(["analyze", "lesion", *common, "--k", "1", "--random", "0", "--bn", "own"]) == 0
    data = json.loads((out / "analysis" / "lesion" / "lesion.json").read_text())
    assert data["bn"] == ["own"] and data["curves"]["own"][0]["random"] is None
    assert main(["analyze", "destruct", *common, "--k", "1", "--permute-k", ""]) == 0
    assert main(["analyze", "erf", *common, "--images", "4"]) == 0
    assert main(["analyze", "logits", *common]) == 0
    written = sorted(p.name for p in (out / "analysis").iterdir())
    assert written == ["destruct", "erf", "lesion", "logits", "subnets"]
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "Does it loaf, and where?" in report and "Sub-network spread" in report


def test_calibration_folder(tmp_path, folder, torchvision_weights):
    """--calib: BN re-estimated from the images of another tree, not the training split."""
    calib = tmp_path / "calib"
    rng = np.random.default_rng(1)
    (calib / "any").mkdir(parents=True)
    for i in range(6):  # batches of 4 and 2: BN in train mode needs 2 values per channel
        pixels = rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(calib / "any" / f"{i}.png")
    data = f"imagefolder:{folder}"
    words = ["--model", "torchvision:resnet18", "--weights", str(torchvision_weights)]
    words += ["--data", data, "--input-size", str(SIDE), "--calib", str(calib)]
    result = lesion_cli(tmp_path, *words)
    ckpt = opened("torchvision:resnet18", torchvision_weights, data, calib=str(calib))
    assert ckpt.data.n_calib == 6 and ckpt.data.n_train == 22  # 24 training images, 2 held out
    check_against_oracle(result, ckpt)
    assert [len(x) for x in ckpt.data.calibration_batches(num_images=8, batch_size=8)] == [6]


@pytest.mark.parametrize(
    "words, message",
    [
        (
            ["--model", "resnet34", "--weights", "{tv}", "--data", "imagefolder:{root}"],
            "missing keys (first: layer1.2.conv1.weight)",
        ),
        (
            ["--model", "resnet18", "--data", "imagefolder:{root}"],
            "give --weights FILE or --pretrained",
        ),
        (["--model", "resnet18", "--weights", "{tv}"], "needs --data"),
        (
            ["--model", "resnet18", "--weights", "{root}/none.pt", "--data", "digits"],
            "no such file",
        ),
        (
            ["--model", "resnet18", "--weights", "{tv}", "--data", "digits"],
            "conv1.weight has shape (64, 3, 7, 7)",
        ),
        (
            [
                "--model",
                "torchvision:squeezenet1_0",
                "--weights",
                "{sq}",
                "--data",
                "imagefolder:{root}",
            ],
            "cannot find the stages of a SqueezeNet",
        ),
        (
            ["{tv}", "--model", "resnet18", "--data", "digits"],
            "give a checkpoint or a model, not both",
        ),
        (
            ["--model", "resnet18", "--weights", "{tv}", "--data", "imagefolder:{root}"]
            + ["--mean", "0.5,0.5"],
            "data.mean=[0.5, 0.5]: give 3 number(s)",
        ),
        (
            ["--model", "resnet20", "--weights", "{tv}", "--data", "digits", "--calib", "{root}"],
            "calibration folders are for image folders",
        ),
        (["--model", "resnet18", "--weights", "{junk}", "--data", "digits"], "holds no state_dict"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    tmp_path, folder, torchvision_weights, capsys, words, message
):
    squeeze = tmp_path / "squeeze.pth"
    torch.save(torchvision.models.squeezenet1_0(num_classes=2).state_dict(), squeeze)
    junk = tmp_path / "junk.pth"
    torch.save({"epoch": 3, "arch": "resnet18"}, junk)
    filled = [w.format(tv=torchvision_weights, root=folder, sq=squeeze, junk=junk) for w in words]
    out = tmp_path / "out"
    assert main(["analyze", "lesion", *filled, "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_eval_select_and_export_take_a_model(tmp_path, capsys):
    torch.manual_seed(2)
    model = nt.create_model("resnet20", num_classes=10, in_chans=1)
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    common = ["--model", "resnet20", "--weights", str(weights), "--data", "recipes/digits_ct.yaml"]
    common += ["--device", "cpu"]
    assert main(["eval", *common, "--subnets", "1-1-1", "--json", str(tmp_path / "e.json")]) == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())
    assert evaluated["checkpoint"] == str(weights) and evaluated["data"] == "digits"
    out = tmp_path / "select"
    assert main(["select", *common, "--space", "1", "--max-mflops", "4", "--out", str(out)]) == 0
    picked = json.loads((out / "analysis" / "select" / "select.json").read_text())
    assert picked["method"] == "foreign" and len(picked["subnets"]) == 8
    small = tmp_path / "small.pt"
    assert main(["export", *common, "--subnet", "1-1-1", "--out", str(small)]) == 0
    sidecar = json.loads((tmp_path / "small.pt.json").read_text())
    assert sidecar["checkpoint"] == str(weights) and sidecar["source_run"] is None
    alone = nt.models.CifarResNet((1, 1, 1), num_classes=10, in_chans=1)
    alone.load_state_dict(torch.load(small), strict=True)
    # a checkpoint and a model at once: one line, exit 2
    capsys.readouterr()
    assert main(["eval", str(weights), *common]) == 2
    assert "not both" in capsys.readouterr().err


def test_a_nestedtrain_checkpoint_as_weights_equals_its_run_folder(tmp_path):
    run = tmp_path / "run"
    overrides = ["epochs=1", "data.train_subset=256", "model.name=resnet20", "eval.subnets=none"]
    assert main(["train", "recipes/digits_ct.yaml", *overrides, "--out", str(run)]) == 0
    words = ["--k", "1", "--random", "0", "--bn", "own", "--device", "cpu"]
    assert main(["analyze", "lesion", str(run), *words]) == 0
    from_run = json.loads((run / "analysis" / "lesion" / "lesion.json").read_text())
    assert from_run["weights"] == "nestedtrain" and from_run["method"] == "ct"
    last = run / "checkpoints" / "last.pt"
    foreign = ["--model", "resnet20", "--weights", str(last), "--data", "recipes/digits_ct.yaml"]
    out = tmp_path / "foreign"
    assert main(["analyze", "lesion", *foreign, *words, "--out", str(out)]) == 0
    from_file = json.loads((out / "analysis" / "lesion" / "lesion.json").read_text())
    assert from_file["blocks"] == from_run["blocks"] and from_file["method"] == "foreign"


def test_pretrained_weights_that_cannot_be_fetched(tmp_path, folder, capsys):
    """--pretrained on a machine without the hub: one line, exit 2, nothing written."""
    out = tmp_path / "out"
    # torchvision refuses its ImageNet weights for a 2-class folder before fetching anything
    words = ["--pretrained", "--device", "cpu", "--out", str(out)]
    tv = ["--model", "torchvision:resnet18", "--data", f"imagefolder:{folder}"]
    assert main(["analyze", "lesion", *tv, *words]) == 2
    assert "expected value 1000 but got 2" in capsys.readouterr().err
    # timm's fetch from the Hugging Face hub, offline
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    command = [sys.executable, "-m", "nestedtrain", "analyze", "lesion"]
    command += ["--model", "resnet18.a1_in1k", "--data", "digits", *words]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "nestedtrain: error: could not fetch the pretrained weights of 'resnet18.a1_in1k'"
        )
    )
    assert not out.exists()


def test_a_vit_with_the_recipes_model_kwargs(tmp_path):
    """A recipe's model.kwargs (a ViT's image and patch size) build the model the weights fit;
    a ViT is one stage of blocks that can each go."""
    kwargs = {"img_size": 8, "patch_size": 4, "depth": 4}
    torch.manual_seed(0)
    model = nt.create_model("vit_tiny_patch16_224", num_classes=10, in_chans=1, **kwargs)
    weights = tmp_path / "vit.pt"
    torch.save(model.state_dict(), weights)
    recipe = tmp_path / "vit_digits.yaml"
    recipe.write_text(
        "model:\n  name: vit_tiny_patch16_224\n  kwargs: {img_size: 8, patch_size: 4, depth: 4}\n"
    )
    words = ["--weights", str(weights), "--data", str(recipe), "--bn", "own", "--split", "val"]
    result = lesion_cli(tmp_path, "--model", "vit_tiny_patch16_224", *words)
    assert [r["block"] for r in result["blocks"]] == [0, 1, 2, 3]
    ckpt = opened("vit_tiny_patch16_224", weights, str(recipe), input_size=None)
    accs = evaluate_one_at_a_time(
        ckpt.model,
        [lesion_subnet(find_stages(ckpt.model), [(0, b)]) for b in range(4)],
        lambda: ckpt.data.eval_batches("val", batch_size=4),
        None,
    )
    assert [r["own"]["acc"] for r in result["blocks"]] == pytest.approx([a["acc"] for a in accs])
