"""A run's per-epoch log: a line of ``metrics.jsonl`` and TensorBoard scalars per epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..records import append_metrics

__all__ = ["EpochLog"]


class EpochLog:
    """Writes each epoch's record to ``RUN/metrics.jsonl`` and ``RUN/tensorboard`` (rank 0)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.writer = None  # opened at the first record

    def write(self, record: dict[str, Any]) -> None:
        append_metrics(self.run_dir, record)
        epoch = record["epoch"]
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run drops the events logged after its checkpoint.
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=epoch)
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "epoch" and value is not None:
                self.writer.add_scalar(key, value, epoch)
        if record.get("subnets"):
            accs = [s["acc"] for s in record["subnets"]]
            self.writer.add_scalar("subnet_acc_mean", sum(accs) / len(accs), epoch)
            self.writer.add_scalar("subnet_acc_min", min(accs), epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
