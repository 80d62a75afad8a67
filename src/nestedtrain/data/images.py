"""Image files that do not open or decode: met while reading a folder, or looked for up front.

A DataLoader worker that cannot decode an image reads the next one of its list instead (a
deterministic choice, so exact resume and per-sample seeds still hold) and returns a report
with the batch. The main process reads the reports (:class:`BadImages`): it logs each bad
file once, counts them, and stops with :class:`BadImageError` under ``data.bad_images=error``
or when more than ``data.max_bad_fraction`` of the images are bad. Workers never decide:
they are separate processes, and only the main process sees them all.

:func:`find_images` and :func:`check_images` serve ``nestedtrain check-data``: every image of
a folder tree opened and fully decoded, in worker processes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from PIL import Image, UnidentifiedImageError

from ..errors import ConfigError

__all__ = [
    "BAD_IMAGE_POLICIES",
    "DECODE_ERRORS",
    "BadImageError",
    "BadImages",
    "check_images",
    "decode_error",
    "find_images",
    "open_rgb",
    "read_or_replace",
]

logger = logging.getLogger("nestedtrain")

BAD_IMAGE_POLICIES = ("skip", "error")
# What PIL raises for a file it cannot read: truncated or empty (OSError, of which
# UnidentifiedImageError is one), a broken chunk (SyntaxError), a bad header field.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    Image.DecompressionBombError,
)
# A worker reads at most this many images in a row for one sample; when none decodes the
# folder is broken, not a few files in it.
MAX_WALK = 32
# Paths listed in summary.json; the count is exact.
LISTED = 100


class BadImageError(ConfigError):
    """An image does not decode under ``data.bad_images=error``, or too many do."""


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode ``path`` as RGB (what torchvision's ``pil_loader`` does)."""
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def _reason(path: str | os.PathLike, err: BaseException) -> str:
    if isinstance(err, UnidentifiedImageError):  # its message repeats the path
        try:
            empty = os.path.getsize(path) == 0
        except OSError:
            empty = False
        return "empty file" if empty else "not an image file PIL can identify"
    text = " ".join(str(err).split()) or "no message"
    return f"{type(err).__name__}: {text}"


def decode_error(path: str | os.PathLike) -> str | None:
    """Why ``path`` does not open and decode as an image, or None when it does."""
    try:
        open_rgb(path)
    except DECODE_ERRORS as err:
        return _reason(path, err)
    return None


def read_or_replace(
    samples: Sequence[tuple[str, int]], index: int, loader: Callable[[str], Any]
) -> tuple[Any, int, str]:
    """Sample ``index`` read with ``loader``, or the next one that decodes.

    Returns ``(image, label, report)``: ``report`` is "" when sample ``index`` decoded, else
    JSON naming the files that did not (and whether none of ``MAX_WALK`` did, in which case
    the image is a blank stand-in), for :meth:`BadImages.record` in the main process.
    """
    bad: list[tuple[str, str]] = []
    for offset in range(min(MAX_WALK, len(samples))):
        path, label = samples[(index + offset) % len(samples)]
        try:
            image = loader(path)
        except DECODE_ERRORS as err:
            bad.append((path, _reason(path, err)))
            continue
        return image, label, json.dumps({"bad": bad, "gave_up": False}) if bad else ""
    return Image.new("RGB", (8, 8)), samples[index][1], json.dumps({"bad": bad, "gave_up": True})


class BadImages:
    """The main process's account of the bad images its loaders reported.

    Under several ranks each rank reads its own shard and would meet a bad file alone: one
    rank stopping while the others wait in the step's gradient all-reduce ends them with a
    traceback (gloo) or a hang (NCCL). So the trainer calls :meth:`defer` there: reports are
    then held until the ranks :meth:`agree` (the trainer does so where they already agree on
    stop requests, and before every checkpoint), every rank learns every rank's files, and
    every rank judges the same list: the same error, at the same step, on all of them. The
    images a rank read in the bad files' place until then are the ones ``skip`` would read.

    Args:
        policy: "skip" (log each file once, go on) or "error" (stop at the first).
        max_fraction: stop once more than this fraction of ``total`` images is bad.
        total: images in the dataset (all splits).
        root: the folder, named in the messages.
    """

    def __init__(self, policy: str, max_fraction: float, total: int, root: str) -> None:
        self.policy, self.max_fraction, self.total, self.root = policy, max_fraction, total, root
        self.found: dict[str, str] = {}  # path -> reason, in the order met
        self._held: list[dict[str, Any]] | None = None  # reports not agreed on yet (deferred)

    def defer(self) -> None:
        """Hold reports until :meth:`agree` instead of judging them as they come."""
        if self._held is None:
            self._held = []

    def record(self, reports: Iterable[str]) -> None:
        """Account for a batch's reports ("" for a sample that decoded); after :meth:`defer`,
        hold them for :meth:`agree`.

        Raises:
            BadImageError: under ``error`` at the first bad file; when more than
                ``max_fraction`` of the images are bad; when no image of a run of
                ``MAX_WALK`` decodes.
        """
        entries = [json.loads(report) for report in reports if report]
        if self._held is not None:
            self._held.extend(entries)
        else:
            self._account(entries)

    @property
    def held(self) -> int:
        """Reports held since the last agreement (0 unless deferred)."""
        return len(self._held) if self._held else 0

    def agree(self, group: Any = None, anywhere: bool | None = None) -> None:
        """Share the held reports of every rank of ``group`` and judge them all, alike on
        every rank. Every rank must call it at the same point. ``anywhere``: whether any rank
        holds reports, when the caller has already agreed on that (one collective fewer).

        Raises:
            BadImageError: as :meth:`record`, on every rank, for the files of all ranks.
        """
        if self._held is None or not (dist.is_available() and dist.is_initialized()):
            self._account(self._held or [])
            self._held = [] if self._held is not None else None
            return
        if anywhere is None:
            count = torch.tensor([self.held])
            dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
            anywhere = bool(count.item())
        if not anywhere:
            return
        every: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, self._held, group=group)
        self._held = []
        self._account([entry for held in every for entry in held])  # rank order

    def _account(self, entries: list[dict[str, Any]]) -> None:
        for entry in entries:
            for path, reason in entry["bad"]:
                if self.policy == "error":
                    raise BadImageError(
                        f"image {path!r} does not decode ({reason}): fix or remove it, or set "
                        f"data.bad_images=skip; nestedtrain check-data {self.root} lists them all"
                    )
                if path not in self.found:
                    self.found[path] = reason
                    logger.warning(f"skipping bad image {path}: {reason}")
            if entry["gave_up"]:
                raise BadImageError(
                    f"none of {len(entry['bad'])} images in a row from {entry['bad'][0][0]!r} "
                    f"decodes: run nestedtrain check-data {self.root}"
                )
        limit = self.max_fraction * self.total
        if len(self.found) > limit:
            raise BadImageError(
                f"{len(self.found)} of the {self.total} images in {self.root!r} do not decode, "
                f"more than data.max_bad_fraction={self.max_fraction} allows ({int(limit)}): "
                f"nestedtrain check-data {self.root} lists them; fix or remove them, or raise "
                "data.max_bad_fraction"
            )

    def summary(self) -> dict[str, Any]:
        """``bad_images`` (the count) and ``bad_image_paths`` (the first ``LISTED``)."""
        return {"bad_images": len(self.found), "bad_image_paths": list(self.found)[:LISTED]}

    def state_dict(self) -> dict[str, Any]:
        return {"found": dict(self.found)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.found = dict(state["found"])


# ------------------------------------------------------------------------------ check-data
def find_images(root: str | os.PathLike) -> list[str]:
    """The image files torchvision's ``ImageFolder`` reads under ``root``.

    ``root`` holds ``train/`` (and ``val/``) of class folders, as ``data.name=imagefolder``
    wants, or is one tree of class folders.

    Raises:
        FileNotFoundError: ``root`` is not a folder, or holds no image of a class folder.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no directory {str(root)!r}: give an image folder tree")
    trees = [root / s for s in ("train", "val") if (root / s).is_dir()] or [root]
    paths: list[str] = []
    for tree in trees:
        _, class_to_idx = find_classes(str(tree))
        paths += [p for p, _ in make_dataset(str(tree), class_to_idx, IMG_EXTENSIONS)]
    return paths


def _quiet_worker() -> None:
    # Stop signals are the parent's to handle: it ends the pool (SIGTERM) on its way out.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for name in ("SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)


def check_images(paths: Sequence[str], workers: int = 1) -> Iterator[tuple[str, str | None]]:
    """``(path, reason or None)`` for each of ``paths``, each opened and fully decoded.

    With ``workers > 1`` the files are decoded in that many processes; results come in the
    order of ``paths``.
    """
    if workers <= 1:
        for path in paths:
            yield path, decode_error(path)
        return
    chunk = max(1, min(64, len(paths) // (workers * 8)))
    pool = ProcessPoolExecutor(workers, initializer=_quiet_worker)
    try:
        yield from zip(paths, pool.map(decode_error, paths, chunksize=chunk))
    finally:
        # Stopped early (Ctrl-C, a closed generator): drop the chunks not started yet.
        pool.shutdown(wait=True, cancel_futures=True)
