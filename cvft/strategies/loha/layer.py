"""LoHA wrapper: a frozen base layer plus ``scaling * (w1_a @ w1_b) ⊙ (w2_a @ w2_b)`` (Hadamard product).

LoHA (Hyeon-Woo et al., "FedPara", ICLR 2022; LyCORIS) multiplies two rank-``r`` products element-wise, which can
reach rank ``r**2`` with the parameters of two rank-``r`` LoRA updates. Initialisation follows LyCORIS: ``w2_a`` is
zero, so a freshly wrapped model computes exactly what the base did; ``w1_a`` is normal with std 0.1 and ``w1_b``,
``w2_b`` are standard normal.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cvft.strategies.lowrank import DeltaWeightLayer

__all__ = ["LoHALayer"]


class LoHALayer(DeltaWeightLayer):
    """LoHA around an ``nn.Linear`` or a plain ``nn.Conv2d`` (grouped and depthwise included).

    The weight is seen as an ``(out, in_flat)`` matrix (``in_flat = in / groups * kh * kw`` for a convolution) and
    the update is ``(w1_a @ w1_b) * (w2_a @ w2_b)`` with ``w*_a`` of shape ``(out, rank)`` and ``w*_b`` of shape
    ``(rank, in_flat)``, scaled by ``alpha / rank``: ``2 * rank * (out + in_flat)`` parameters.

    Args:
        base: The layer to adapt; its parameters are frozen.
        rank: Rank of each of the two products.
        alpha: Scale numerator; the update is scaled by ``alpha / rank``.
        dropout: Dropout probability on the update's input.

    Example:
        >>> import torch
        >>> layer = LoHALayer(nn.Conv2d(8, 8, 3, padding=1, groups=8), rank=2, alpha=2)
        >>> sum(p.numel() for _, p in layer.lora_parameters()) == 2 * 2 * (8 + 9)
        True
        >>> x = torch.randn(1, 8, 5, 5)
        >>> torch.equal(layer(x), layer.base(x))  # w2_a starts at zero
        True
    """

    method = "loha"

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16, dropout: float = 0.0) -> None:
        super().__init__(base, rank, alpha, dropout)
        out_features, in_flat = self.matrix_shape
        weight = base.weight
        self.hada_w1_a = nn.Parameter(torch.empty(out_features, rank, device=weight.device, dtype=weight.dtype))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, in_flat, device=weight.device, dtype=weight.dtype))
        self.hada_w2_a = nn.Parameter(torch.empty(out_features, rank, device=weight.device, dtype=weight.dtype))
        self.hada_w2_b = nn.Parameter(torch.empty(rank, in_flat, device=weight.device, dtype=weight.dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """LyCORIS initialisation: the update starts at exactly zero (``w2_a = 0``)."""
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)
        nn.init.normal_(self.hada_w2_b, std=1.0)

    def delta_matrix(self) -> Tensor:
        """``(w1_a @ w1_b) * (w2_a @ w2_b)``, of shape ``(out, in_flat)``."""
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)
