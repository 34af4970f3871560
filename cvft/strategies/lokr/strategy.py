"""The ``lokr`` strategy: LoKr updates on the chosen layers of a frozen backbone."""

from __future__ import annotations

from typing import Any

from torch import nn

from cvft.strategies.lokr.layer import LoKrLayer, check_factor
from cvft.strategies.lowrank import LowRankStrategy, inject_low_rank
from cvft.strategies.registry import register_strategy

__all__ = ["LoKr", "inject_lokr"]


def inject_lokr(model: nn.Module, targets: str | list[str] = "auto", **options: Any) -> list[str]:
    """Wrap the targets in :class:`LoKrLayer` (``options``: its arguments); see :func:`.inject_low_rank`."""
    return inject_low_rank(model, targets, LoKrLayer, **options)


@register_strategy
class LoKr(LowRankStrategy):
    """Low-rank Kronecker adaptation: freeze the backbone and learn ``W + (alpha / r) * C ⊗ (B A)``.

    Targets are chosen as for ``lora``; the arguments not listed below, and merging and export, are the low-rank
    family's (:class:`~cvft.strategies.lowrank.LowRankStrategy`).

    Args:
        rank: Rank ``r`` of ``B A`` (and of ``C`` with ``factor_c``).
        factor: How each weight dimension is split between ``C`` and ``B A``: ``-1`` for the most balanced split,
            or the largest size ``C`` may have along each dimension.
        factor_c: Also factor ``C`` into a rank-``r`` product.
        kwargs: The low-rank family's arguments (``rank`` as above, ``alpha``, ``dropout``, ``targets``,
            ``train_head``, ``train_bias``).

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit", num_classes=3)
        >>> LoKr(rank=2, targets="vit_attention").setup(model)
        >>> model.blocks[0].attn.qkv.kron_shapes  # qkv weight (192, 64) = (12 x 8) kron (16 x 8)
        ((12, 8), (16, 8))
    """

    name = "lokr"

    def __init__(self, *, factor: int = -1, factor_c: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_factor(factor)
        self.factor = factor
        self.factor_c = bool(factor_c)

    def make_layer(self, base: nn.Module) -> LoKrLayer:
        """A :class:`LoKrLayer` around ``base``."""
        return LoKrLayer(base, factor=self.factor, factor_c=self.factor_c, **self.layer_options())
