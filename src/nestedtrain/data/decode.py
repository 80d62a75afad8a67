"""JPEG decoding outside the loader workers: TorchCodec's ``decode_jpeg`` or NVIDIA DALI.

With ``data.decoder=pil`` (the default) a DataLoader worker decodes each image with PIL and
runs the whole per-image transform. With ``torchcodec`` or ``dali`` a worker only reads the
file's bytes (and checks that they are a complete RGB or greyscale JPEG) and sends its batch
as one flat byte tensor; the main process decodes the batch where the model runs:
``torchcodec.decoders.decode_jpeg`` (nvJPEG, batched, on CUDA; libjpeg-turbo on the CPU;
torchvision's deprecated ``decode_jpeg`` where TorchCodec is not installed) or a DALI pipeline
(its ``mixed`` decoder on CUDA, its CPU decoder threads otherwise); ``torchvision`` is the
earlier name of ``torchcodec`` and means the same. Each decoded image then goes through the
same torchvision/timm transform objects as the PIL path, on the tensor, inside the image's own
seed scope (a final colour jitter runs on the whole batch with the factors each image drew):
the same crop box, flip and colour-jitter factors as ``decoder=pil`` for every image, only
resampled by torch instead of PIL.

Files that are not such JPEGs (PNG, CMYK, truncated, not an image at all, EXIF-rotated) take
the PIL path in the worker, where a file that does not decode is replaced and reported as
before (``read_or_replace``). A batch the decoder rejects is redone image by image with PIL in the
main process, with the same replacement and report.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from ..errors import ConfigError
from .images import DECODE_ERRORS
from .samples import pil_sample
from .seeding import host_rng_reseeder
from .transforms import TRIVIAL_AUGMENT, BatchColorJitter, to_device

__all__ = [
    "DECODERS",
    "BatchDecoder",
    "Encoded",
    "EncodedBatch",
    "EncodedSamples",
    "check_decoder",
    "collate_encoded",
    "make_decode",
    "tensor_stages",
]

DECODERS = ("pil", "torchcodec", "dali")
# Earlier names, kept so that older recipes run: "torchvision" decoded with torchvision's
# decode_jpeg, which torchvision 0.29 deprecates in favour of TorchCodec's.
_ALIASES = {"torchvision": "torchcodec"}
_DALI_INSTALL = (
    "pip install 'nestedtrain[dali]' (the CUDA 13 build; nvidia-dali-cuda120 for CUDA 12)"
)
_JPEG_START, _JPEG_END = b"\xff\xd8", b"\xff\xd9"
_EXIF_ORIENTATION = 0x0112


def check_decoder(name: str, decoder: str, auto_augment: str | None) -> None:
    """Raise ConfigError unless ``decoder`` can run on dataset ``name`` with ``auto_augment``."""
    if _ALIASES.get(decoder, decoder) not in DECODERS:
        raise ConfigError(f"data.decoder={decoder!r}: must be one of {list(DECODERS)}")
    if decoder == "pil":
        return
    if name != "imagefolder":
        raise ConfigError(
            f"data.decoder={decoder!r} decodes image files: {name} is held as tensors, "
            "so leave data.decoder=pil"
        )
    if auto_augment and auto_augment != TRIVIAL_AUGMENT:
        raise ConfigError(
            f"data.auto_augment={auto_augment!r} runs on PIL images only (timm's policies): "
            f"use data.decoder=pil with it, or {TRIVIAL_AUGMENT!r}, which runs on tensors"
        )
    if decoder == "dali":
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"data.decoder='dali': NVIDIA DALI is not installed: {_DALI_INSTALL}"
            ) from None


@dataclass
class Encoded:
    """One sample as a worker reads it: the file's bytes, or an image it decoded itself.

    Attributes:
        data: the JPEG file's bytes (uint8), or None when ``image`` is set.
        image: the uint8 CHW result of the PIL path (a file that is not a plain JPEG).
        label, index, seed: the sample's label, its place in the split, its transform seed
            (None for the evaluation transform).
        report: "" or the bad-file report of ``read_or_replace``.
    """

    data: torch.Tensor | None
    image: torch.Tensor | None
    label: int
    index: int
    seed: int | None
    report: str = ""


def _plain_jpeg(data: bytes) -> bool:
    """Whether ``data`` looks like a whole baseline/progressive RGB or greyscale JPEG, upright.

    A truncated file lacks the end marker (PIL refuses it, libjpeg-turbo and DALI would fill
    it with grey silently); CMYK and odd modes are left to PIL's conversion. A file with an
    EXIF orientation too: TorchCodec's ``decode_jpeg`` always applies it, while ImageFolder's
    loader, torchvision's ``decode_jpeg`` and DALI (as set here) do not. Reads only the header.
    """
    # the tail only: no copy of the whole file (longer zero padding falls back to PIL)
    if not data.startswith(_JPEG_START) or not data[-4096:].rstrip(b"\0").endswith(_JPEG_END):
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:
            upright = img.getexif().get(_EXIF_ORIENTATION, 1) == 1
            return img.format == "JPEG" and img.mode in ("RGB", "L") and upright
    except DECODE_ERRORS:
        return False


class EncodedSamples(Dataset):
    """``(path, label)`` samples as :class:`Encoded`: bytes of plain JPEGs, PIL for the rest.

    A key is an index or ``(index, seed)``, as for the PIL path; ``pil_transform`` is that
    path's whole transform (up to a uint8 tensor), used for files that are not plain JPEGs.
    """

    def __init__(self, samples: list[tuple[str, int]], loader: Callable, pil_transform: Callable):
        self.samples, self.loader, self.pil_transform = samples, loader, pil_transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: Any) -> Encoded:
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            data = b""
        if _plain_jpeg(data):
            return Encoded(
                torch.frombuffer(bytearray(data), dtype=torch.uint8), None, label, index, seed
            )
        image, label, report = pil_sample(
            self.samples, index, seed, self.loader, self.pil_transform
        )
        return Encoded(None, image, label, index, seed, report)


@dataclass
class EncodedBatch:
    """A batch of :class:`Encoded` samples as a worker sends it: all bytes in one flat tensor.

    A tensor sent by a worker holds a shared-memory file descriptor in the main process for
    as long as it lives: a tensor per image made thousands with prefetching and pinning
    ("Too many open files"), one per batch makes a few. ``pin_memory`` (called by the
    DataLoader on CUDA) pins that one tensor, so its copies to the device do not block.

    Attributes:
        buffer: flat uint8: each sample's JPEG bytes, or the CHW pixels of its PIL path.
        offsets: sample ``i`` is ``buffer[offsets[i]:offsets[i + 1]]`` (Python ints, which
            travel in the message, not as more shared tensors).
        shapes: None for JPEG bytes, the CHW shape of a PIL-path image.
        labels, indices, seeds, reports: as in :class:`Encoded`, one per sample.
    """

    buffer: torch.Tensor
    offsets: list[int]
    shapes: list[tuple[int, ...] | None]
    labels: list[int]
    indices: list[int]
    seeds: list[int | None]
    reports: list[str]

    def __len__(self) -> int:
        return len(self.shapes)

    def sample(self, i: int) -> torch.Tensor:
        """Sample ``i``: its JPEG bytes (1-D), or its uint8 CHW image; a view of ``buffer``."""
        part = self.buffer[self.offsets[i] : self.offsets[i + 1]]
        shape = self.shapes[i]
        return part if shape is None else part.view(shape)

    def pin_memory(self) -> EncodedBatch:
        return dataclasses.replace(self, buffer=self.buffer.pin_memory())


def collate_encoded(items: list[Encoded]) -> EncodedBatch:
    """DataLoader's collate for :class:`EncodedSamples`: files differ in length, so their
    bytes are concatenated, with their offsets."""
    parts = [item.image.reshape(-1) if item.data is None else item.data for item in items]
    return EncodedBatch(
        buffer=torch.cat(parts),
        offsets=[0, *itertools.accumulate(len(part) for part in parts)],
        shapes=[None if item.data is not None else tuple(item.image.shape) for item in items],
        labels=[item.label for item in items],
        indices=[item.index for item in items],
        seeds=[item.seed for item in items],
        reports=[item.report for item in items],
    )


class _DaliDecoder:
    """A DALI pipeline that decodes a list of JPEG byte tensors into HWC uint8 images.

    Fed from the main process (``external_source``), run synchronously: the batch's images are
    what the trainer asks for now, in its order, and it runs one batch ahead on its own.
    """

    def __init__(self, device: torch.device, threads: int):
        self.device, self.threads, self.max_batch = device, threads, 0
        self._pipe = None

    def _build(self) -> Any:
        from nvidia.dali import fn, pipeline_def, types

        cuda = self.device.type == "cuda"

        @pipeline_def(
            batch_size=self.max_batch,
            num_threads=self.threads,
            device_id=(self.device.index or 0) if cuda else None,
            exec_pipelined=False,
            exec_async=False,
            prefetch_queue_depth=1,
        )
        def pipeline():
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
            # EXIF orientation is not applied, as torchvision's ImageFolder loader and
            # decode_jpeg do not apply it: the three decoders see the same pixels
            return fn.decoders.image(
                jpegs,
                device="mixed" if cuda else "cpu",
                output_type=types.RGB,
                adjust_orientation=False,
            )

        pipe = pipeline()
        pipe.build()
        return pipe

    def __call__(self, datas: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(datas) > self.max_batch:  # DALI fixes the largest batch when it builds
            self.max_batch, self._pipe = len(datas), None
        if self._pipe is None:
            self._pipe = self._build()
        try:
            self._pipe.feed_input("jpegs", [d.numpy() for d in datas])
            (out,) = self._pipe.run()
        except Exception:
            self._pipe = None  # DALI leaves a pipeline that failed unusable
            raise
        return [self._to_torch(out[i]) for i in range(len(datas))]

    def _to_torch(self, tensor: Any) -> torch.Tensor:
        if self.device.type != "cuda":
            return torch.from_numpy(np.array(tensor)).permute(2, 0, 1)
        from nvidia.dali.plugin.pytorch import feed_ndarray

        image = torch.empty(tuple(tensor.shape()), dtype=torch.uint8, device=self.device)
        feed_ndarray(tensor, image, cuda_stream=torch.cuda.current_stream(self.device))
        return image.permute(2, 0, 1)


def _torch_jpeg_decoder() -> tuple[Callable, Any]:
    """TorchCodec's ``decode_jpeg`` and its RGB mode, or torchvision's where TorchCodec is
    missing or does not load (its wheels are built for one torch each; none for macOS)."""
    try:
        from torchcodec.decoders import decode_jpeg

        return decode_jpeg, "RGB"
    except (ImportError, OSError, RuntimeError):
        from torchvision.io import ImageReadMode, decode_jpeg

        return decode_jpeg, ImageReadMode.RGB


def _decode_jpegs(
    datas: list[torch.Tensor], device: torch.device, decode_jpeg: Callable, mode: Any
) -> list[torch.Tensor]:
    images = decode_jpeg(datas, mode=mode, device=device)
    return [images] if isinstance(images, torch.Tensor) else list(images)


def make_decode(
    decoder: str, device: torch.device, threads: int
) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """JPEG byte tensors to CHW uint8 images on ``device``, with ``decoder`` ("torchcodec", its
    old name "torchvision", or "dali"; DALI with ``threads`` CPU threads)."""
    if decoder == "dali":
        return _DaliDecoder(device, max(1, threads))
    decode_jpeg, mode = _torch_jpeg_decoder()
    return functools.partial(_decode_jpegs, device=device, decode_jpeg=decode_jpeg, mode=mode)


def _drain_current_stream(device: torch.device) -> None:
    """On CUDA, wait on the host until the current stream has run everything queued on it."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def tensor_stages(pil_transform: Any) -> tuple[Callable, BatchColorJitter | None]:
    """The stages of a PIL transform ending in ``PILToTensor``, to run on a CHW uint8 tensor:
    the per-image ones, and a final colour jitter to run on the whole batch (or None).

    torchvision's and timm's crops, resizes, flips, ColorJitter and TrivialAugmentWide take
    tensors as well as PIL images, and draw the same random numbers for both."""
    stages = _flat(pil_transform)
    if not stages or not isinstance(stages[-1], T.PILToTensor):
        raise ValueError(f"expected a transform ending in PILToTensor, got {pil_transform}")
    stages = stages[:-1]
    if stages and isinstance(stages[-1], T.ColorJitter) and stages[-1].hue is None:
        return T.Compose(stages[:-1]), BatchColorJitter(stages[-1])
    return T.Compose(stages), None


def _flat(transform: Any) -> list:
    if isinstance(transform, T.Compose):
        return [stage for inner in transform.transforms for stage in _flat(inner)]
    return [transform]


class BatchDecoder:
    """The main process's half of ``decoder=torchcodec|dali``: an :class:`EncodedBatch`
    to a uint8 batch on ``device``, its labels and its bad-file reports.

    Args:
        decode: from :func:`make_decode`.
        device: where the images are transformed.
        samples, loader: the split's ``(path, label)`` list and PIL loader (for fallbacks).
        pil_transform: the PIL path's transform, up to a uint8 tensor; its stages before
            ``PILToTensor`` run on each decoded image.
    """

    def __init__(
        self,
        decode: Callable[[list[torch.Tensor]], list[torch.Tensor]],
        device: torch.device,
        samples: list[tuple[str, int]],
        loader: Callable,
        pil_transform: Any,
    ):
        self.decode, self.device, self.samples, self.loader = decode, device, samples, loader
        self.pil_transform = pil_transform
        self.per_image, self.jitter = tensor_stages(pil_transform)

    def __call__(self, batch: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        labels, reports = list(batch.labels), list(batch.reports)
        images: list[torch.Tensor | None] = [
            None if shape is None else batch.sample(i).to(self.device, non_blocking=True)
            for i, shape in enumerate(batch.shapes)
        ]
        todo = [i for i, shape in enumerate(batch.shapes) if shape is None]
        decoded = self._decode([batch.sample(i) for i in todo]) if todo else []
        jitter: list[tuple[int, tuple]] = []  # (place in the batch, factors) of decoded images
        with host_rng_reseeder() as reseed:  # one RNG save and restore for the batch
            for slot, i in enumerate(todo):
                seed = batch.seeds[i]
                if decoded is None:  # the decoder refused a file: this batch goes through PIL
                    image, labels[i], reports[i] = pil_sample(
                        self.samples, batch.indices[i], seed, self.loader, self.pil_transform
                    )
                    images[i] = image.to(self.device)
                    continue
                if seed is not None:
                    reseed(seed)
                images[i] = self.per_image(decoded[slot])
                if self.jitter is not None:  # drawn after the crop's and flip's numbers
                    jitter.append((i, self.jitter.draw()))
        if jitter:
            places = [i for i, _ in jitter]
            jittered = self.jitter(torch.stack([images[i] for i in places]), [p for _, p in jitter])
            for i, image in zip(places, jittered):
                images[i] = image
        return torch.stack(images), to_device(torch.tensor(labels), self.device), reports

    def _decode(self, datas: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """The decoded images, or None when the decoder refuses one of the files.

        On CUDA the host first waits for the current stream (the loader's side stream) to run
        what is queued on it. The caching allocator hands a block freed on a stream straight
        back to the next allocation on that stream, trusting stream order: the previous
        batch's decoded images, freed when this object returned, may still be read by crop
        kernels queued there. A decoder that writes outside that order then overwrites them:
        torchvision's ``decode_jpeg`` allocates on the caller's stream and writes from a
        private one that does not wait for it (pytorch/vision PR 9606), and nvJPEG's hardware
        engine (A100, H100; baseline JPEGs) does not wait for the stream it is given
        (TorchCodec 0.16 corrupted there too, meta-pytorch/torchcodec PR 1634). Once the
        stream is drained every block it can hand out is idle, whatever the decoder does.
        With TorchCodec it adds no wait: its CUDA decode already synchronises that same stream
        on the host before it returns (the wait moves earlier, as in that PR's fix).
        """
        _drain_current_stream(self.device)
        try:
            return self.decode(datas)
        except (RuntimeError, ValueError):
            return None
