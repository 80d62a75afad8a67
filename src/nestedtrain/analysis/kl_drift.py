"""How far sub-networks' outputs drift from the main network's during training (Fig. 7 of ST).

The trainer calls :func:`kl_drift_snapshot` every ``analysis.kl_drift_every`` epochs and
:func:`append_kl_drift` writes one line per snapshot to ``RUN/analysis/kl_drift.jsonl``:
``{"epoch": e, "kl": [{"subnet": "3-2-4", "kl": 0.12}, ...]}``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..elastic.stages import unwrap
from ..elastic.subnet import Subnet
from .subnets import (
    DEFAULT_MEMORY_MB,
    CalibBatches,
    EvalBatches,
    subnet_logits,
    subnet_stats,
)

__all__ = [
    "KL_DRIFT_FILE",
    "append_kl_drift",
    "kl_drift_snapshot",
    "kl_drift_summary",
    "read_kl_drift",
]

KL_DRIFT_FILE = Path("analysis") / "kl_drift.jsonl"


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
    ``memory_mb`` as for :func:`~nestedtrain.analysis.subnets.subnet_logits`).

    Returns:
        ``{subnet string: mean KL in nats}``, in the order of ``subnets``.
    """
    model = unwrap(model)
    if not subnets:
        raise ValueError("kl_drift_snapshot got no sub-networks: pass at least one")
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


def append_kl_drift(run_dir: str | Path, epoch: int, snapshot: dict[str, float]) -> Path:
    """Append one snapshot as a line of ``RUN/analysis/kl_drift.jsonl``; returns the file."""
    path = Path(run_dir) / KL_DRIFT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"epoch": int(epoch), "kl": [{"subnet": s, "kl": v} for s, v in snapshot.items()]}
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    return path


def read_kl_drift(run_dir: str | Path) -> list[dict[str, Any]]:
    """The snapshots of a run, by epoch (a resumed run's repeated epochs keep the last one).

    Raises:
        ValueError: the run recorded none.
    """
    path = Path(run_dir) / KL_DRIFT_FILE
    if not path.is_file():
        raise ValueError(
            f"{str(path)!r} does not exist: train with analysis.kl_drift_every=E (E >= 1) to "
            "record KL(main || sub-network) every E epochs"
        )
    records: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records[int(record["epoch"])] = record
        except (ValueError, KeyError, TypeError):
            raise ValueError(
                f"{str(path)!r} line {number} is not a KL snapshot: expected "
                '{"epoch": E, "kl": [{"subnet": S, "kl": V}, ...]}'
            ) from None
    if not records:
        raise ValueError(f"{str(path)!r} holds no snapshots")
    return [records[e] for e in sorted(records)]


def kl_drift_summary(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per recorded epoch: count, max, mean, std, min and median of the KL values."""
    out = []
    for record in records:
        values = sorted(entry["kl"] for entry in record["kl"])
        n = len(values)
        median = (values[(n - 1) // 2] + values[n // 2]) / 2
        out.append({"epoch": record["epoch"], **subnet_stats(values), "median": median})
    return out
