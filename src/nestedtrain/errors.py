"""The package's exceptions, and the exit status the command line gives each.

- :class:`ConfigError`: a user's input is wrong, as opposed to a bug (status 2).
- :class:`TrainingInterrupted`: a stop signal arrived and the run stopped after a step, its
  checkpoint written (:data:`EXIT_INTERRUPTED`: "requeue me").
- :class:`TrainingDiverged`: a loss term stopped being finite (:data:`EXIT_DIVERGED`: "look at
  me").

Only the standard library: :mod:`nestedtrain.signals` imports it before torch loads.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "EXIT_DIVERGED",
    "EXIT_INTERRUPTED",
    "ConfigError",
    "TrainingDiverged",
    "TrainingInterrupted",
]

# sysexits' EX_TEMPFAIL: a temporary failure, run the same command (with --resume) again.
EXIT_INTERRUPTED = 75
# The run cannot go on: lower the learning rate, or resume from an earlier checkpoint.
EXIT_DIVERGED = 3


class ConfigError(ValueError):
    """A user's input is wrong: a recipe field, an override, an option, a path or a file.

    The message says what was wrong, with the offending value, and what would be right; the
    command line prints it as one line and exits with status 2. Any other exception is a bug
    and keeps its traceback. It is a ``ValueError`` so that callers catching ``ValueError``
    keep working.
    """


class TrainingInterrupted(Exception):
    """A stop signal arrived; the run stopped after a step and its checkpoint is written."""

    exit_status = EXIT_INTERRUPTED

    def __init__(self, signal_name: str, epoch: int, step: int, checkpoint: Path):
        self.signal_name, self.epoch, self.step, self.checkpoint = (
            signal_name,
            epoch,
            step,
            checkpoint,
        )
        super().__init__(
            f"{signal_name}: stopped after step {step} of epoch {epoch + 1}; checkpoint "
            f"{checkpoint} written, continue with --resume"
        )


class TrainingDiverged(Exception):
    """A loss term became NaN or infinite; nothing after the last finite checkpoint is saved."""

    exit_status = EXIT_DIVERGED

    def __init__(self, epoch: int, step: int, term: str, value: float, checkpoint: Path | None):
        self.epoch, self.step, self.term, self.value = epoch, step, term, value
        kept = (
            f"{checkpoint} holds the last finite state"
            if checkpoint is not None
            else "no checkpoint was written yet"
        )
        super().__init__(
            f"training diverged: loss term {term!r} is {value} at step {step} of epoch "
            f"{epoch + 1}; {kept} (lower optim.lr, or set optim.clip_grad)"
        )
