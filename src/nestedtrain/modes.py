"""Train/eval mode of a model, put back as it was.

``model.train(was_training)`` after a temporary ``model.eval()`` sets every submodule to the
root's mode, so a model whose parts were in different modes (a frozen BN, a backbone kept in
eval) comes back changed; these context managers restore each module's own mode instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode", "kept_modes"]


@contextmanager
def kept_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, change modes at will; on exit every module of ``model`` gets its own back.

    Enter it while every module is attached: modules swapped out of the model inside (as
    :func:`~nestedtrain.elastic.use_subnet` does) are restored only if they were there on entry.
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside; each module's own mode restored on exit."""
    with kept_modes(model):
        model.eval()
        yield model
