"""Losses: cross-entropy with hard or soft targets, and the KL / KL⁻ distillation terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ConfigError

__all__ = ["KL_NORMS", "cross_entropy", "kl_loss", "normalize_logits"]

KL_NORMS = ("none", "std", "l2")


def normalize_logits(
    logits: torch.Tensor, norm: str = "none", amplitude: float = 1.0
) -> torch.Tensor:
    """Remove the logits' magnitude (KL⁻) and rescale them by ``amplitude``.

    ``std`` is the ST++ reference code's form: layer norm over the classes (zero mean, unit
    standard deviation, eps 1e-7). ``l2`` is the paper's formula: the unit-L2 vector. The two
    differ by a factor sqrt(num_classes) in scale. ``none`` returns the logits unchanged.
    """
    if norm == "none":
        return logits
    if norm == "std":
        return F.layer_norm(logits, logits.shape[-1:], eps=1e-7) * amplitude
    if norm == "l2":
        return F.normalize(logits, p=2, dim=-1) * amplitude
    raise ConfigError(f"unknown logit norm {norm!r}: use one of {', '.join(KL_NORMS)}")


def kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    norm: str = "none",
    temperature: float = 1.0,
    amplitude: float = 1.0,
) -> torch.Tensor:
    """Batch-mean KL(teacher ‖ student); the teacher is a constant (detached).

    Both sides are normalised by ``norm`` and scaled by ``amplitude``, divided by the
    temperature T, and the loss is multiplied by T² so its gradient scale does not depend on T.
    """
    if temperature <= 0:
        raise ConfigError(f"temperature={temperature} must be > 0")
    student = normalize_logits(student_logits, norm, amplitude) / temperature
    teacher = normalize_logits(teacher_logits.detach(), norm, amplitude) / temperature
    kl = F.kl_div(
        F.log_softmax(student, dim=-1),
        F.log_softmax(teacher, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return kl * temperature**2


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """CE for class indices or soft targets (mixup/cutmix give probabilities per class)."""
    if target.dtype.is_floating_point:
        # soft targets already carry mixup's smoothing; F.cross_entropy takes probabilities
        return F.cross_entropy(logits, target)
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)
