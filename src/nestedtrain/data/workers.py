"""DataLoader workers of the folder path: how many, how they end, and batches made ready ahead.

A worker ignores the stop signals a scheduler sends to every process of a job (the main
process decides on them and ends its workers itself), leaves when its main process is gone,
and persistent workers are stopped at interpreter exit. On CUDA each batch is copied and
prepared on a side stream while the previous one is used.
"""

from __future__ import annotations

import atexit
import functools
import os
import signal
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from .seeding import WORKERS, make_generator

__all__ = [
    "ahead_on_device",
    "default_workers",
    "ignore_stop_signals",
    "loader_options",
    "stop_at_exit",
    "stop_workers",
]


def default_workers() -> int:
    """DataLoader workers when ``data.num_workers`` is None: the CPUs this process may use,
    shared by the ranks of this node (torchrun's LOCAL_WORLD_SIZE), less one for the main
    process, at least 1 and at most 16."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per_rank = (cpus or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(16, per_rank - 1))


def loader_options(
    workers: int, device: torch.device, seed: int, persistent: bool = False
) -> dict[str, Any]:
    """The DataLoader arguments of the folder path: ``workers`` workers (``persistent``: kept
    between epochs) that ignore stop signals, pinned memory on CUDA, a seeded base seed."""
    return dict(
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=persistent and workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        # The loader draws its workers' base seed from this, not from torch's global RNG.
        generator=make_generator(seed, WORKERS),
        # the main process's pid, taken here: a worker that starts after its death would
        # read its new parent's
        worker_init_fn=functools.partial(ignore_stop_signals, parent=os.getpid()),
    )


def ahead_on_device(
    batches: Iterable[Any], prepare: Callable[[Any], tuple[torch.Tensor, ...]], device: torch.device
) -> Iterator[tuple[torch.Tensor, ...]]:
    """``prepare(batch)`` of each batch (its copy to ``device`` and the work there), in order.

    On CUDA the next batch is prepared on a side stream while the current one is used, as
    timm's PrefetchLoader does: its host-to-device copy and normalisation overlap the step.
    The device JPEG decoders run in ``prepare`` on the side stream too; ``BatchDecoder`` waits
    for that stream before each decode (a decoder may write outside stream order), and the
    main stream's use of a batch is ordered by ``wait_stream`` and ``record_stream`` below.
    """
    if device.type != "cuda":
        yield from map(prepare, batches)
        return
    side, main = torch.cuda.Stream(device), torch.cuda.current_stream(device)
    iterator = iter(batches)

    def next_ready():
        batch = next(iterator, None)
        if batch is None:
            return None
        with torch.cuda.stream(side):
            return prepare(batch)

    ready = next_ready()
    while ready is not None:
        main.wait_stream(side)
        for tensor in ready:
            tensor.record_stream(main)  # made on the side stream, freed after main's use
        current, ready = ready, next_ready()
        yield current


# The loaders whose persistent workers must be stopped at interpreter exit, if still alive.
_PERSISTENT: weakref.WeakSet[DataLoader] = weakref.WeakSet()


def stop_at_exit(loader: DataLoader) -> None:
    """Stop ``loader``'s workers at interpreter exit, should it still be alive then.

    atexit calls its functions last registered first, and multiprocessing registered its own
    when torch loaded: the first registration here runs before it. Its handler sends daemonic
    children SIGTERM, which our workers ignore, and then joins them: without this, a script
    that still holds a folder ``Data`` when it ends (the README's own loop) never exits.
    """
    if not _PERSISTENT:
        atexit.unregister(_stop_persistent)  # registered once, however many Data are built
        atexit.register(_stop_persistent)
    _PERSISTENT.add(loader)


def _stop_persistent() -> None:
    for loader in list(_PERSISTENT):
        stop_workers(loader)


def stop_workers(loader: DataLoader) -> None:
    """End ``loader``'s persistent workers now, as its iterator's collection would.

    By hand because torch has no public call for it: DataLoader keeps the iterator of
    persistent workers in ``_iterator`` and stops them in its ``_shutdown_workers`` (asks
    each worker to leave, joins it, terminates what is left), also run when it is collected.
    """
    iterator, loader._iterator = getattr(loader, "_iterator", None), None
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def ignore_stop_signals(worker_id: int, parent: int) -> None:
    """A DataLoader worker outlives SIGTERM and SIGUSR1: the main process decides on them.

    torch's workers die on SIGTERM (a C handler prints and re-raises it), and a scheduler
    sends it to every process of a job: the dead worker would end the main process mid-step
    with a traceback, before it can write its checkpoint. The main process ends its workers
    itself on the way out (:func:`stop_workers`), and they leave by themselves when it is
    gone (:func:`_leave_with_parent`).
    """
    for name in ("SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    threading.Thread(target=_leave_with_parent, args=(parent,), daemon=True).start()


def _leave_with_parent(parent: int, every: float = 0.5) -> None:
    """End this worker within ``every`` seconds of the death of its main process (pid
    ``parent``: SIGKILL, a crash), which no signal can tell it since it ignores them.

    torch's worker loop notices a dead parent too, every 5 s, but then exits through
    multiprocessing's teardown, which waits for its result queue's feeder thread; the
    queue's pipe is held open by the other workers, so that wait can last forever (seen: 1
    run in 4 left the workers alive). ``os._exit`` skips it: nobody is left to read.
    """
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(0)
