"""The ``loha`` strategy: LoHA updates on the chosen layers of a frozen backbone."""

from __future__ import annotations

from typing import Any

from torch import nn

from cvft.strategies.loha.layer import LoHALayer
from cvft.strategies.lowrank import LowRankStrategy, inject_low_rank
from cvft.strategies.registry import register_strategy

__all__ = ["LoHA", "inject_loha"]


def inject_loha(model: nn.Module, targets: str | list[str] = "auto", **options: Any) -> list[str]:
    """Wrap the targets in :class:`LoHALayer` (``options``: its arguments); see :func:`.inject_low_rank`."""
    return inject_low_rank(model, targets, LoHALayer, **options)


@register_strategy
class LoHA(LowRankStrategy):
    """Low-rank Hadamard adaptation: freeze the backbone and learn ``W + (alpha / r) * (B1 A1) ⊙ (B2 A2)``.

    Targets are chosen as for ``lora``; the arguments not listed below, and merging and export, are the low-rank
    family's (:class:`~cvft.strategies.lowrank.LowRankStrategy`).

    Args:
        rank: Rank ``r`` of each of the two products.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit", num_classes=3)
        >>> LoHA(rank=2, targets="vit_attention").setup(model)
        >>> sorted(n for n, p in model.named_parameters() if p.requires_grad)[:2]
        ['blocks.0.attn.proj.hada_w1_a', 'blocks.0.attn.proj.hada_w1_b']
    """

    name = "loha"

    def make_layer(self, base: nn.Module) -> LoHALayer:
        """A :class:`LoHALayer` around ``base``."""
        return LoHALayer(base, **self.layer_options())
