"""Evaluation: accuracy of a network, and of its sub-networks with BN statistics re-estimated
for each, computing the blocks that sub-networks share once.

- :func:`evaluate`: one network, with its own BN statistics.
- :func:`evaluate_subnets`: each sub-network's accuracy; :func:`kl_drift_snapshot`: each
  sub-network's ``KL(p_main || p_sub)``. Both read :func:`subnet_logits`, which runs a trie
  of the sub-networks (:mod:`~nestedtrain.evaluation.passes`), or one sub-network at a time
  when the model's forward cannot be split (:mod:`~nestedtrain.evaluation.one_at_a_time`).
- ``memory_mb`` bounds the images and activations held at once, not the result
  (:mod:`~nestedtrain.evaluation.batches`).

Which sub-networks to evaluate: :func:`nestedtrain.elastic.space_subnets` and
:func:`nestedtrain.elastic.subnets_from_spec`. A training run evaluates at each epoch's end
with these (:mod:`nestedtrain.engine.epoch_eval`), and so do ``eval`` and the analyses.
"""

from .accuracy import evaluate, evaluate_subnets
from .batches import DEFAULT_MEMORY_MB, CalibBatches, EvalBatches, within_free_memory
from .divergence import kl_drift_snapshot
from .passes import subnet_logits

__all__ = [
    "DEFAULT_MEMORY_MB",
    "CalibBatches",
    "EvalBatches",
    "evaluate",
    "evaluate_subnets",
    "kl_drift_snapshot",
    "subnet_logits",
    "within_free_memory",
]
