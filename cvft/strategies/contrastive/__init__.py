"""Supervised contrastive fine-tuning: the SupCon loss, its distributed form and the ``supcon`` strategy."""

from cvft.strategies.contrastive.distributed import distributed_supcon_loss, gather_batch
from cvft.strategies.contrastive.loss import supcon_anchor_losses, supcon_loss
from cvft.strategies.contrastive.strategy import SupCon, linear_probe_after_contrastive, projection_head

__all__ = [
    "SupCon",
    "supcon_loss",
    "supcon_anchor_losses",
    "distributed_supcon_loss",
    "gather_batch",
    "projection_head",
    "linear_probe_after_contrastive",
]
