"""The images a sub-network evaluation reads, and how many of them it holds at once.

Batches come from callables that return a fresh iterable on each call (a pass may read them
more than once). Both passes of a shared-prefix evaluation read them in chunks of consecutive
batches sized from a memory budget, so that memory does not grow with the number of images.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Union

import torch
from torch import nn

from ..errors import ConfigError

__all__ = [
    "DEFAULT_MEMORY_MB",
    "CalibBatches",
    "Consumer",
    "EvalBatches",
    "MainConsumer",
    "chunks",
    "device_of",
    "first_images",
    "images_of",
    "memory_budget",
    "peek",
    "pieces",
    "within_free_memory",
]

EvalBatches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
CalibBatches = Callable[[], Iterable[Union[torch.Tensor, Sequence[torch.Tensor]]]]
# consume(subnet indices, batch index, logits, labels): called once per leaf and eval batch.
Consumer = Callable[[list[int], int, torch.Tensor, torch.Tensor], None]
# consume_main(batch index, logits, labels): the main network's logits, once per eval batch.
MainConsumer = Callable[[int, torch.Tensor, torch.Tensor], None]

# MiB of activations a shared-prefix evaluation caches at once, unless told otherwise.
DEFAULT_MEMORY_MB = 1024


def images_of(batch: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The images of a batch given as images or as ``(images, labels)``."""
    return batch if isinstance(batch, torch.Tensor) else batch[0]


def pieces(batches: Iterable[Any], max_images: int) -> Iterator[Any]:
    """Each ``(images, labels)`` batch of more than ``max_images`` images as consecutive pieces
    of at most ``max_images``: eval-mode outputs do not depend on the batch they come in."""
    for images, labels in batches:
        if images.shape[0] <= max_images:
            yield images, labels
        else:
            yield from zip(images.split(max_images), labels.split(max_images))


def chunks(batches: Iterable[Any], max_images: int) -> Iterator[list]:
    """Consecutive batches, at most ``max_images`` images a chunk but at least one batch
    (``max_images=0``: everything in one chunk)."""
    chunk, count = [], 0
    for batch in batches:
        n = images_of(batch).shape[0]
        if chunk and max_images and count + n > max_images:
            yield chunk
            chunk, count = [], 0
        chunk.append(batch)
        count += n
    if chunk:
        yield chunk


def peek(batches: Iterable[Any]) -> tuple[Any, Iterator[Any]]:
    """The first item (``None`` when there is none) and an iterator over all of them."""
    iterator = iter(batches)
    first = next(iterator, None)
    return first, (iterator if first is None else itertools.chain([first], iterator))


def first_images(
    calib_batches: CalibBatches | None, eval_batches: EvalBatches
) -> tuple[torch.Tensor, Iterator[Any] | None, Iterator[Any] | None]:
    """Two images to probe the model with, from the calibration batches (or the eval batches
    without calibration), and the iterator they came from, still holding them."""
    calib = evals = None
    if calib_batches is not None:
        first, calib = peek(images_of(b) for b in calib_batches())
        if first is None:
            raise ConfigError("calibration got no batches: pass at least one batch of images")
    else:
        first, evals = peek(eval_batches())
        if first is None:
            raise ConfigError("evaluation got no images")
        first = first[0]
    return first[:2], calib, evals


def memory_budget(
    subnets: Sequence[Any], chunk_images: int | None, memory_mb: float | None
) -> float | None:
    """The memory budget in bytes (None: no limit), once the arguments are checked."""
    if not subnets:
        raise ConfigError("no sub-networks to evaluate: pass at least one")
    if chunk_images is not None and chunk_images < 1:
        raise ConfigError(f"chunk_images={chunk_images} must be >= 1 or None")
    if memory_mb is not None and not memory_mb > 0:
        raise ConfigError(f"memory_mb={memory_mb} must be > 0 (MiB) or None for no limit")
    return None if memory_mb is None else memory_mb * 2**20


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without any)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def within_free_memory(budget: float | None, device: torch.device) -> float | None:
    """On CUDA, a ``budget`` in bytes capped to half the device memory free now: a budget set
    for another GPU, or left at its default on a busy one, then cannot run the device out of
    memory (the result does not depend on it). Elsewhere, or None (no limit, asked for),
    ``budget`` as it is."""
    if device.type != "cuda" or budget is None:
        return budget
    free, _ = torch.cuda.mem_get_info(device)
    return min(budget, free / 2)
