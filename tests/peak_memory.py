"""Peak tensor memory of a piece of code, on any device (the CPU included).

``torch.cuda.max_memory_allocated`` exists only on CUDA, and the profiler's CPU memory events
and torch's ``MemTracker`` (which refuses a module called twice in one pass, as every
sub-network step does) don't cover a training step on the CPU; so this counts by hand what
every operator allocates, under a dispatch mode that also sees the backward pass.

A measuring tool of the tests (``test_shared_prefix.py``) and of ``bench/bench_speed.py``,
not of the package.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["PeakMemory"]


class PeakMemory(TorchDispatchMode):
    """Bytes of tensor storage allocated inside the ``with`` block and alive at once.

    Storage that existed before the block (parameters, inputs, optimizer state) is not
    counted; gradients and activations created inside are, until they are freed::

        with PeakMemory() as memory:
            method.step(images, labels)
        memory.peak  # bytes

    Attributes:
        peak: the most bytes alive at any moment inside the block.
        current: bytes allocated inside and still alive.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _freed(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage not in self._seen:
                    nbytes = storage.nbytes()
                    self._seen[storage] = nbytes
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
                    # A storage's Python object lives exactly as long as the storage.
                    weakref.finalize(storage, self._freed, nbytes)
        return out
