"""data.decoder=torchcodec|dali: workers read JPEG bytes, the main process decodes them; the
batches are the PIL path's (same crops, flips, jitter, labels, bad-file account), resampled by
torch instead of PIL."""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_bad_images import BAD, _break, _tree

from nestedtrain.cli import main
from nestedtrain.data import DataConfig, build_data, decode
from nestedtrain.data.decode import (
    BatchDecoder,
    EncodedBatch,
    EncodedSamples,
    collate_encoded,
    make_decode,
)
from nestedtrain.data.transforms import folder_train_transform

try:
    import nvidia.dali  # noqa: F401

    HAS_DALI = True
except ImportError:
    HAS_DALI = False
# DALI is the [dali] extra, which `make install` and CI install on x86-64 Linux.
DECODERS = [
    "torchcodec",
    pytest.param("dali", marks=pytest.mark.skipif(not HAS_DALI, reason="no DALI wheel here")),
]


def _smooth_tree(root: Path, per_class: int = 10) -> Path:
    """JPEGs of smooth gradients (so that PIL's and torch's resampling agree closely), of
    several sizes and aspect ratios, 2 classes; 5 test images per class; the first of each
    class folder carries an EXIF orientation (rotate 90°)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 5)):
        for c in range(2):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = (int(v) for v in rng.integers(40, 90, 2))
                yy, xx = np.mgrid[0:h, 0:w]
                pixels = np.stack([xx * 255 / w, yy * 255 / h, np.full((h, w), 40 + 100 * c)], -1)
                pixels = (pixels + rng.normal(0, 3, pixels.shape)).clip(0, 255).astype(np.uint8)
                image = Image.fromarray(pixels)
                exif = image.getexif()
                if i == 0:  # an EXIF rotation: ImageFolder's loader leaves it, TorchCodec not
                    exif[0x0112] = 6
                image.save(folder / f"{i}.jpg", quality=95, exif=exif)
    return root


def _folder(root: Path, decoder: str, **options) -> DataConfig:
    """An image-folder config with no validation split."""
    return DataConfig(name="imagefolder", root=str(root), val_size=0.0, decoder=decoder, **options)


def _batches(root: Path, decoder: str, seed: int = 3, **options):
    cfg = _folder(root, decoder, img_size=32, num_workers=0, **options)
    data = build_data(cfg, batch_size=8, seed=seed, device="cpu")
    # 10 test images in batches of 4: the last batch is partial
    return list(data.train_batches(0)) + list(data.eval_batches("test", batch_size=4))


@pytest.fixture(scope="module")
def smooth_root(tmp_path_factory):
    return _smooth_tree(tmp_path_factory.mktemp("smooth"))


@pytest.mark.parametrize("decoder", [*DECODERS, "torchvision-fallback"])
def test_decoders_give_the_pil_batches_up_to_resampling(smooth_root, decoder, monkeypatch):
    options = dict(color_jitter=0.4, hflip=0.5)
    pil = _batches(smooth_root, "pil", **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if decoder == "torchvision-fallback":  # TorchCodec missing: torchvision's decode_jpeg
            monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
            decoder = "torchcodec"
            got = _batches(smooth_root, decoder, **options)
            assert any(w.category is DeprecationWarning for w in caught)  # torchvision 0.29
        else:
            got = _batches(smooth_root, decoder, **options)
            assert not [w for w in caught if w.category is DeprecationWarning]
    other_seed = _batches(smooth_root, "pil", seed=4, **options)
    assert len(got) == len(pil) == 2 + 3
    for (x, y), (x_pil, y_pil), (_x_other, _) in zip(got, pil, other_seed):
        assert x.shape == x_pil.shape and x.dtype == torch.float32
        assert torch.equal(y, y_pil)
        # normalised units: 0.02 is about a grey level; another seed's crops are far apart
        assert (x - x_pil).abs().mean() < 0.02
    train_gap = [(x - x_o).abs().mean() for (x, _), (x_o, _) in zip(got[:2], other_seed[:2])]
    assert min(train_gap) > 0.2


def test_decoded_batches_resume_at_any_step_with_workers(smooth_root):
    cfg = _folder(smooth_root, "torchcodec", img_size=16, num_workers=2, color_jitter=0.4)
    data = build_data(cfg, batch_size=4, seed=0, device="cpu")
    whole = list(data.train_batches(1))
    rest = list(data.train_batches(1, start=3))
    assert len(rest) == len(whole) - 3 == 2
    for (x, y), (x_rest, y_rest) in zip(whole[3:], rest):
        assert torch.equal(x, x_rest) and torch.equal(y, y_rest)
    # the same images whichever process decodes them: with no workers, bit for bit
    cfg.num_workers = 0
    alone = list(build_data(cfg, batch_size=4, seed=0, device="cpu").train_batches(1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole, alone))


@pytest.mark.parametrize("decoder", DECODERS)
def test_decoders_replace_and_report_bad_files_as_pil_does(tmp_path, decoder):
    root = _tree(tmp_path / "images", per_class=6)
    files = _break(root)  # truncated, empty, text; CMYK, grey and a misnamed JPEG are good
    accounts, labels = {}, {}
    for name in ("pil", decoder):
        cfg = _folder(root, name, img_size=16, num_workers=0, max_bad_fraction=0.5)
        data = build_data(cfg, batch_size=4, seed=0, device="cpu")
        batches = list(data.train_batches(0)) + list(data.eval_batches("test", batch_size=4))
        labels[name] = torch.cat([y for _, y in batches])
        accounts[name] = data.bad_images.summary()
    assert torch.equal(labels[decoder], labels["pil"])
    assert accounts[decoder] == accounts["pil"]
    assert sorted(accounts["pil"]["bad_image_paths"]) == sorted(str(files[k]) for k in BAD)


def test_a_batch_the_decoder_refuses_is_redone_with_pil(smooth_root):
    samples = sorted(
        (str(p), int(p.parent.name[-1])) for p in (smooth_root / "train").rglob("*.jpg")
    )
    transform = folder_train_transform(16, "rrc", 0, 0.5, None)
    dataset = EncodedSamples(samples, lambda path: Image.open(path).convert("RGB"), transform)
    assert samples[0][0].endswith("0.jpg")  # EXIF-rotated: the PIL path, as ImageFolder's
    assert dataset[0].data is None and dataset[0].image is not None
    items = [dataset[(i, 100 + i)] for i in range(1, 5)]
    assert all(item.data is not None and item.image is None for item in items)
    batch = collate_encoded(items)

    def refuse(datas):
        raise RuntimeError("nvjpeg: bad bitstream")

    x, y, reports = BatchDecoder(refuse, torch.device("cpu"), samples, dataset.loader, transform)(
        batch
    )
    expected = torch.stack(
        [transform_with_seed(transform, samples[i][0], 100 + i) for i in range(1, 5)]
    )
    assert torch.equal(x, expected)
    assert y.tolist() == [samples[i][1] for i in range(1, 5)] and reports == [""] * 4
    decoded, *_ = BatchDecoder(
        make_decode("torchcodec", torch.device("cpu"), 1),
        torch.device("cpu"),
        samples,
        dataset.loader,
        transform,
    )(batch)
    assert (decoded.float() - expected.float()).abs().mean() < 2  # grey levels


def transform_with_seed(transform, path: str, seed: int) -> torch.Tensor:
    from nestedtrain.data.seeding import host_rng_scope

    with host_rng_scope(seed):
        return transform(Image.open(path).convert("RGB"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.decoder=nvjpeg"], "data.decoder='nvjpeg': must be one of"),
        (["data.name=digits", "data.decoder=torchcodec"], "leave data.decoder=pil"),
        (["data.auto_augment=rand-m9-mstd0.5", "data.decoder=torchcodec"], "decoder=pil"),
    ],
)
def test_bad_decoder_settings_stop_in_one_line(tmp_path, capsys, smooth_root, overrides, message):
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "digits_ct.yaml")
    folder = ["data.name=imagefolder", f"data.root={smooth_root}", "data.img_size=16"]
    status = main(["train", recipe, *folder, *overrides, "epochs=1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.count("\n") == 0 and message in err
    assert not (tmp_path / "r").exists()


def test_dali_not_installed_says_how_to_install_it(smooth_root, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import fails as if absent
    cfg = DataConfig(name="imagefolder", root=str(smooth_root), decoder="dali")
    with pytest.raises(
        ValueError, match=r"NVIDIA DALI is not installed: pip install 'nestedtrain\[dali\]'"
    ):
        build_data(cfg, batch_size=4, seed=0, device="cpu")


@pytest.mark.parametrize("decoder", [*DECODERS, "torchvision"])  # the old name runs TorchCodec
def test_a_st_run_trains_calibrates_and_evaluates_with_the_decoder(tmp_path, smooth_root, decoder):
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "digits_st.yaml")
    overrides = [
        "data.name=imagefolder",
        f"data.root={smooth_root}",
        "data.img_size=16",
        "data.val_size=0",
        "data.num_workers=1",
        "data.calib_images=6",
        f"data.decoder={decoder}",
        "data.train_subset=null",
        "model.name=resnet20",
        "batch_size=4",
        "epochs=1",
        "eval.subnets=sample:2",
    ]
    assert main(["train", recipe, *overrides, "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["bad_images"] == 0 and 0 <= summary["main_acc"] <= 100
    assert len(summary["subnets"]) == 2
    assert f"decoder: {decoder}" in (tmp_path / "run" / "config.yaml").read_text()


def test_batch_color_jitter_is_torchvisions_per_image_jitter():
    from torchvision import transforms as T

    from nestedtrain.data.seeding import host_rng_scope
    from nestedtrain.data.transforms import BatchColorJitter

    images = torch.randint(0, 256, (40, 3, 12, 10), dtype=torch.uint8)
    for strengths in [(0.4, 0.4, 0.4), (0.8, 0.0, 0.3)]:
        jitter = T.ColorJitter(*strengths)
        batched = BatchColorJitter(jitter)
        expected, params = [], []
        for i, image in enumerate(images):
            with host_rng_scope(1000 + i):
                expected.append(jitter(image))
            with host_rng_scope(1000 + i):
                params.append(batched.draw())
        assert len({order for order, *_ in params}) > 5  # many orders in one batch
        got = batched(images, params)
        diff = (got.int() - torch.stack(expected).int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, diff.max()


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/self/fd (Linux)")
def test_a_held_batch_costs_one_descriptor_not_one_per_image(tmp_path):
    # Each tensor a worker sends holds a shared-memory file descriptor in the main process as
    # long as it lives: a tensor per image made thousands with prefetching ("Too many open
    # files"); the batch's bytes in one flat tensor make one.
    rng = np.random.default_rng(0)
    for i in range(20 * 64):
        folder = tmp_path / "train" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    shutil.copytree(tmp_path / "train", tmp_path / "val")
    cfg = _folder(tmp_path, "torchcodec", img_size=8, num_workers=2)
    data = build_data(cfg, batch_size=64, seed=0, device="cpu")
    batches = iter(data._train_loader)
    try:
        held = [next(batches)]  # the workers are up: their pipes are open
        before = _open_descriptors()
        held += [next(batches) for _ in range(19)]
        grown = _open_descriptors() - before
    finally:
        batches._shutdown_workers()  # persistent workers: not left to the interpreter's exit
    assert len(held) == 20 and sum(len(batch) for batch in held) == 20 * 64
    assert grown <= 2 * 19, f"{grown} more open descriptors for 19 batches of 64 images"


def test_the_stream_is_drained_before_every_decode(smooth_root, monkeypatch):
    # On CUDA a decoder may write outside stream order (torchvision's private stream, nvJPEG's
    # hardware engine) into blocks the allocator just took back from the previous batch,
    # whose crop kernels may still be queued: BatchDecoder drains the current stream first.
    calls = []
    monkeypatch.setattr(decode, "_drain_current_stream", lambda device: calls.append("drain"))
    real = make_decode("torchcodec", torch.device("cpu"), 1)

    def stand_in(decoder, device, threads):
        def record(datas):
            calls.append("decode")
            return real(datas)

        return record

    monkeypatch.setattr("nestedtrain.data.folder.make_decode", stand_in)
    batches = _batches(smooth_root, "torchcodec")
    assert len(batches) == 5 and calls == ["drain", "decode"] * 5

    class Stream:  # what the drain does on CUDA: the current stream, waited for on the host
        def synchronize(self):
            calls.append("synchronize")

    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: Stream())
    calls.clear()
    decode._drain_current_stream(torch.device("cuda", 0))
    decode._drain_current_stream(torch.device("cpu"))
    assert calls == ["synchronize"]


def test_the_loader_pins_a_batch_as_one_tensor(smooth_root, monkeypatch):
    from torch.utils.data._utils.pin_memory import pin_memory  # what DataLoader calls

    samples = sorted((str(p), 0) for p in (smooth_root / "train").rglob("*.jpg"))
    transform = folder_train_transform(16, "rrc", 0, 0.5, None)
    dataset = EncodedSamples(samples, lambda path: Image.open(path).convert("RGB"), transform)
    batch = collate_encoded([dataset[(i, i)] for i in range(6)])  # one EXIF image: PIL path
    assert batch.shapes[0] == (3, 16, 16) and batch.shapes[1:] == [None] * 5
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(t) or t.clone())
    out = pin_memory(batch)
    assert isinstance(out, EncodedBatch) and len(pinned) == 1 and pinned[0] is batch.buffer
    assert torch.equal(out.sample(0), dataset[(0, 0)].image)
    assert torch.equal(out.sample(3), dataset[3].data)


def test_batch_color_jitter_copies_the_factors_to_the_device_once(monkeypatch):
    # On CUDA a torch.tensor(..., device=) from Python numbers is a blocking copy; the factors
    # of the whole batch go in one tensor (pinned, queued: transforms.to_device).
    from torchvision import transforms as T

    from nestedtrain.data import transforms
    from nestedtrain.data.seeding import host_rng_scope
    from nestedtrain.data.transforms import BatchColorJitter

    batched = BatchColorJitter(T.ColorJitter(0.4, 0.4, 0.4))
    params = []
    for i in range(40):
        with host_rng_scope(i):
            params.append(batched.draw())
    assert len({order for order, *_ in params}) > 5
    copies, on_device = [], []
    real_copy, real_tensor = transforms.to_device, torch.tensor
    monkeypatch.setattr(
        transforms, "to_device", lambda t, device: copies.append(t) or real_copy(t, device)
    )

    def tensor(*args, **kwargs):
        if kwargs.get("device") is not None:
            on_device.append(kwargs["device"])
        return real_tensor(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", tensor)
    batched(torch.randint(0, 256, (40, 3, 6, 5), dtype=torch.uint8), params)
    assert [tuple(t.shape) for t in copies] == [(40, 4)] and on_device == []
