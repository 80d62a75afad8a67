"""How far sub-networks' outputs drift from the main network's: ``KL(p_main || p_sub)`` per
sub-network (Fig. 7 of ST), each with BN statistics re-estimated for it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..elastic.stages import unwrap
from ..elastic.subnet import Subnet
from ..errors import ConfigError
from .batches import DEFAULT_MEMORY_MB, CalibBatches, EvalBatches
from .passes import subnet_logits

__all__ = ["kl_drift_snapshot"]


@torch.no_grad()
def kl_drift_snapshot(
    model: nn.Module,
    subnets: Sequence[Subnet | str],
    eval_batches: EvalBatches,
    calib_batches: CalibBatches,
    chunk_images: int | None = None,
    memory_mb: float | None = DEFAULT_MEMORY_MB,
) -> dict[str, float]:
    """Mean ``KL(p_main || p_sub)`` over the eval images, per sub-network.

    The main network runs with its own BN statistics; each sub-network with statistics
    re-estimated for it, as when it is evaluated. The model's statistics and train/eval mode
    are restored afterwards. Sums are all-reduced when distributed. The main network's
    log-probabilities are kept for one chunk of images at a time (``chunk_images`` and
    ``memory_mb`` as for :func:`subnet_logits`).

    Returns:
        ``{subnet string: mean KL in nats}``, in the order of ``subnets``.
    """
    model = unwrap(model)
    if not subnets:
        raise ConfigError("kl_drift_snapshot got no sub-networks: pass at least one")
    sums = torch.zeros(len(subnets), dtype=torch.float64)
    images = [0]
    # Per eval batch: the main network's log-probabilities and how many sub-networks have
    # yet to be compared with them (then they are dropped).
    main: dict[int, list] = {}

    def consume_main(t: int, logits: torch.Tensor, labels: torch.Tensor) -> None:
        main[t] = [F.log_softmax(logits.float(), dim=1), len(subnets)]
        images[0] += logits.shape[0]

    def consume(indices: list[int], t: int, logits: torch.Tensor, labels: torch.Tensor) -> None:
        entry = main[t]
        sub = F.log_softmax(logits.float(), dim=1)
        kl = F.kl_div(sub, entry[0], log_target=True, reduction="sum").double().cpu()
        for i in indices:
            sums[i] += kl
        entry[1] -= len(indices)
        if entry[1] == 0:
            del main[t]

    subnet_logits(
        model,
        subnets,
        eval_batches,
        calib_batches,
        consume,
        chunk_images,
        memory_mb,
        consume_main=consume_main,
    )
    count = torch.tensor([float(images[0])], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        device = next(model.parameters()).device
        reduced = torch.cat([sums, count]).to(device)
        dist.all_reduce(reduced)
        sums, count = reduced[:-1].cpu(), reduced[-1:].cpu()
    means = (sums / count).tolist()
    return {str(s): kl for s, kl in zip(subnets, means)}
