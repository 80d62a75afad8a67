"""Sub-networks evaluated one at a time: for a model whose forward cannot be split into stem,
blocks and head (:class:`~nestedtrain.elastic.ModelSplit`), so no prefix can be shared."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .. import bn
from ..elastic.subnet import Subnet, use_subnet
from ..errors import ConfigError
from .batches import CalibBatches, Consumer, EvalBatches, MainConsumer

__all__ = ["one_at_a_time_logits"]


def one_at_a_time_logits(
    model: nn.Module,
    subnets: Sequence[Subnet],
    eval_batches: EvalBatches,
    calib_batches: CalibBatches | None,
    consume: Consumer,
    consume_main: MainConsumer | None,
) -> None:
    """Every sub-network's logits on every eval batch to ``consume``, each sub-network run
    whole (``consume`` and ``consume_main`` as for
    :func:`~nestedtrain.evaluation.subnet_logits`, which calls this).

    Nothing is cached: ``bn.recalibrate`` and the evaluation stream their batches. With
    ``consume_main`` the loops turn around: the BN statistics re-estimated for each
    sub-network are kept (no images), and each eval batch runs through the main network
    and then through every sub-network. The caller restores the model's BN statistics.
    """
    seen = 0
    if consume_main is None:
        for index, subnet in enumerate(subnets):
            if calib_batches is not None:
                bn.recalibrate(model, calib_batches(), subnet)
            model.eval()
            with use_subnet(model, subnet):
                for t, (images, labels) in enumerate(eval_batches()):
                    consume([index], t, model(images), labels)
                    seen += 1
            if not seen:
                raise ConfigError("evaluation got no images")
        return
    own = bn.save_stats(model)
    stats = []
    if calib_batches is not None:
        for subnet in subnets:
            bn.recalibrate(model, calib_batches(), subnet)
            stats.append(bn.save_stats(model))
    model.eval()
    for t, (images, labels) in enumerate(eval_batches()):
        bn.load_stats(model, own)
        consume_main(t, model(images), labels)
        for index, subnet in enumerate(subnets):
            if stats:
                bn.load_stats(model, stats[index])
            with use_subnet(model, subnet):
                consume([index], t, model(images), labels)
        seen += 1
    if not seen:
        raise ConfigError("evaluation got no images")
