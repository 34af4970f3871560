"""Supervised contrastive fine-tuning: the SupCon loss, its distributed form and the ``supcon`` strategy.

The two-stage recipe's second run (:func:`~cvft.workflows.linear_probe_after_contrastive`) lives in
:mod:`cvft.workflows`, above the tasks it builds; its old path here is a deprecated alias.
"""

from cvft._deprecation import moved_names
from cvft.strategies.contrastive.distributed import distributed_supcon_loss, gather_batch
from cvft.strategies.contrastive.loss import supcon_anchor_losses, supcon_loss
from cvft.strategies.contrastive.strategy import SupCon, projection_head

__all__ = [
    "SupCon",
    "supcon_loss",
    "supcon_anchor_losses",
    "distributed_supcon_loss",
    "gather_batch",
    "projection_head",
]

__getattr__ = moved_names(__name__, {"linear_probe_after_contrastive": "cvft.workflows"})
