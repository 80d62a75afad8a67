"""Image folders with files that do not decode: skipped deterministically, or a one-line stop;
``nestedtrain check-data`` finds them up front."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nestedtrain as nt
from nestedtrain.cli import main
from nestedtrain.data import BadImageError, DataConfig, build_data

SMALL = ["data.train_subset=null", "batch_size=6", "eval.subnets=sample:2", "optim.lr=0.05"]
RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "digits_ct.yaml")


def _train(out: Path, root: Path, *overrides: str) -> int:
    """``nestedtrain train`` on the folder ``root``, in this process."""
    folder = ["data.name=imagefolder", f"data.root={root}", "data.img_size=16", "data.val_size=0"]
    small = ["model.name=resnet20", "eval.subnets=none", "batch_size=4", "epochs=1"]
    return main(["train", RECIPE, *folder, *small, *overrides, "--out", str(out)])


def _image(rng: np.random.Generator, c: int) -> Image.Image:
    h, w = (int(v) for v in rng.integers(28, 40, 2))
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    pixels[..., c % 3] //= 2  # something to learn
    return Image.fromarray(pixels)


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _tree(root: Path, per_class: int = 12, classes: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 3)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                _image(rng, c).save(folder / f"{i}.jpg", quality=90)
    return root


def _break(root: Path) -> dict[str, Path]:
    """Three bad files (truncated, empty, text) among three odd but good ones."""
    rng = np.random.default_rng(1)
    good = _jpeg_bytes(_image(rng, 0))
    folder = root / "train" / "class0"
    files = {
        "truncated": folder / "truncated.JPEG",
        "empty": folder / "empty.JPEG",
        "text": root / "val" / "class1" / "notes.jpg",
        "cmyk": folder / "cmyk.jpg",
        "gray": folder / "gray.jpg",
        "png_named_jpeg": folder / "really_a_jpeg.png",
    }
    files["truncated"].write_bytes(good[: len(good) // 2])
    files["empty"].write_bytes(b"")
    files["text"].write_text("not an image\n")
    _image(rng, 1).convert("CMYK").save(files["cmyk"], format="JPEG")
    _image(rng, 1).convert("L").save(files["gray"], format="JPEG")
    files["png_named_jpeg"].write_bytes(_jpeg_bytes(_image(rng, 0)))
    return files


BAD = ("truncated", "empty", "text")


def _cfg(root: Path, *overrides: str):
    return nt.load_config(
        None,
        [
            *SMALL,
            "method=st",
            "data.name=imagefolder",
            f"data.root={root}",
            "data.img_size=16",
            "data.val_size=0",
            "data.calib_images=6",
            "epochs=2",
            *overrides,
        ],
    )


def test_check_data_lists_exactly_the_bad_files_with_two_workers(tmp_path, capsys):
    root = _tree(tmp_path / "images", per_class=3)
    files = _break(root)
    assert main(["check-data", str(root), "--workers", "2"]) == 1
    out, err = capsys.readouterr()
    listed = [line.split(": ", 1)[0] for line in out.splitlines() if ": " in line]
    assert sorted(listed) == sorted(str(files[k]) for k in BAD)
    total = 2 * 3 + 2 * 3 + 6
    assert f"3 of {total} images do not decode" in out
    assert "it/s" in err or "%" in err  # the progress bar is on stderr
    # a single class-folder tree, and a recipe naming the root, are read the same way
    assert main(["check-data", str(root / "train"), "--workers", "1"]) == 1
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  name: imagefolder\n  root: {root}\n")
    assert main(["check-data", str(recipe), "--workers", "2"]) == 1
    for key in BAD:
        files[key].unlink()
    capsys.readouterr()
    assert main(["check-data", str(root), "--workers", "2"]) == 0
    assert f"all {total - 3} images decode" in capsys.readouterr().out


def test_check_data_refuses_what_is_no_image_folder(tmp_path, capsys):
    assert main(["check-data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nowhere" in err
    recipe = tmp_path / "digits.yaml"
    recipe.write_text("data:\n  name: digits\n")
    assert main(["check-data", str(recipe)]) == 2
    assert "imagefolder" in capsys.readouterr().err


def test_bad_images_are_skipped_alike_with_and_without_workers(tmp_path, caplog):
    root = _tree(tmp_path / "images")
    files = _break(root)
    summaries = {}
    with caplog.at_level(logging.WARNING, logger="nestedtrain"):
        for workers in (2, 0):
            run = tmp_path / f"w{workers}"
            cfg = _cfg(root, f"data.num_workers={workers}", "data.max_bad_fraction=0.2")
            summaries[workers] = nt.train(cfg, run)
    # every bad file is logged once per run, as one line naming it
    skipped = [r.getMessage() for r in caplog.records if "skipping bad image" in r.getMessage()]
    assert len(skipped) == 2 * len(BAD)
    assert all("\n" not in m for m in skipped)
    for key in BAD:
        assert sum(str(files[key]) in m for m in skipped) == 2
    for summary in summaries.values():
        assert summary["bad_images"] == 3
        assert sorted(summary["bad_image_paths"]) == sorted(str(files[k]) for k in BAD)
    on_disk = json.loads((tmp_path / "w2" / "summary.json").read_text())
    assert on_disk["bad_images"] == 3
    # the replacement does not depend on which worker read the file
    a, b = torch.load(tmp_path / "w2" / "weights.pt"), torch.load(tmp_path / "w0" / "weights.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_error_policy_stops_at_the_first_bad_file_in_one_line(tmp_path, capsys):
    root = _tree(tmp_path / "images", per_class=4)
    files = _break(root)
    files["empty"].unlink()
    files["text"].unlink()
    cfg = DataConfig(
        name="imagefolder", root=str(root), img_size=16, bad_images="error", num_workers=2
    )
    data = build_data(cfg, batch_size=4, seed=0, device="cpu")
    with pytest.raises(BadImageError, match="truncated.JPEG"):
        for _ in data.calibration_batches(num_images=100, batch_size=4):
            pass
    status = _train(tmp_path / "run", root, "data.bad_images=error", "data.max_bad_fraction=1")
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.count("\n") == 0 and str(files["truncated"]) in err and "bad_images=skip" in err


def test_too_many_bad_images_stop_in_one_line(tmp_path, capsys):
    root = _tree(tmp_path / "images", per_class=4)
    _break(root)
    # the default allows 0.1% bad: 3 of 20 are too many
    status = _train(tmp_path / "run", root)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert "max_bad_fraction=0.001" in err[-1] and "check-data" in err[-1]


@pytest.mark.parametrize(
    "override, match",
    [("data.bad_images=ignore", "bad_images='ignore'"), ("data.max_bad_fraction=2", "fraction")],
)
def test_bad_image_options_are_checked(tmp_path, capsys, override, match):
    assert main(["train", RECIPE, override, "--out", str(tmp_path / "run")]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
