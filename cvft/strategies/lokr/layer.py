"""LoKr wrapper: a frozen base layer plus ``scaling * C ⊗ (B @ A)`` (Kronecker product).

LoKr (Yeh et al., "Navigating Text-To-Image Customization", ICLR 2024; LyCORIS) sees the weight as an
``(out, in_flat)`` matrix with ``out = o1 * o2`` and ``in_flat = i1 * i2`` and learns ``C`` of shape ``(o1, i1)``
and a rank-``r`` product ``B @ A`` of shape ``(o2, i2)``. ``B`` starts at zero, so a freshly wrapped model computes
exactly what the base did.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from cvft.errors import StrategyError
from cvft.strategies.lowrank import DeltaWeightLayer

__all__ = ["LoKrLayer", "check_factor", "factorize"]


def check_factor(factor: int) -> None:
    """Refuse a ``factor`` that is neither ``-1`` (balanced) nor a positive integer.

    Example:
        >>> check_factor(0)
        Traceback (most recent call last):
        ...
        cvft.errors.StrategyError: lokr: factor must be -1 (balanced) or a positive integer, got 0.
    """
    if not isinstance(factor, int) or isinstance(factor, bool) or (factor < 1 and factor != -1):
        raise StrategyError(f"lokr: factor must be -1 (balanced) or a positive integer, got {factor!r}.")


def factorize(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)`` with ``m * n == dimension``; ``m`` is the size of the Kronecker factor C.

    With ``factor == -1``, ``m`` is the largest divisor of ``dimension`` not above its square root (the most
    balanced split); with ``factor > 0``, ``m`` is the largest divisor of ``dimension`` not above ``factor``.

    Example:
        >>> factorize(64), factorize(192), factorize(48, factor=4), factorize(7)
        ((8, 8), (12, 16), (4, 12), (1, 7))
    """
    check_factor(factor)
    limit = math.isqrt(dimension) if factor == -1 else min(factor, dimension)
    m = max(d for d in range(1, limit + 1) if dimension % d == 0)
    return m, dimension // m


class LoKrLayer(DeltaWeightLayer):
    """LoKr around an ``nn.Linear`` or a plain ``nn.Conv2d`` (grouped and depthwise included).

    The update is ``kron(C, B @ A)`` reshaped to the base weight, scaled by ``alpha / rank``. ``C`` has shape
    ``(o1, i1)`` (or is the rank-``rank`` product ``C_b @ C_a`` with ``factor_c``), ``B`` ``(o2, rank)`` and
    ``A`` ``(rank, i2)``, where ``(o1, o2) = factorize(out, factor)`` and ``(i1, i2) = factorize(in_flat, factor)``.
    Parameter names follow LyCORIS: ``lokr_w1`` (or ``lokr_w1_a`` = ``C_b``, ``lokr_w1_b`` = ``C_a``) for ``C``,
    ``lokr_w2_a`` for ``B`` and ``lokr_w2_b`` for ``A``.

    Args:
        base: The layer to adapt; its parameters are frozen.
        factor: ``-1`` for the most balanced split of each dimension, or the largest size ``C`` may have.
        factor_c: Also factor ``C`` into a rank-``rank`` product ``C_b @ C_a``.
        kwargs: The family's arguments, with their defaults (:class:`~cvft.strategies.lowrank.DeltaWeightLayer`):
            ``rank`` (of ``B @ A``, and of ``C`` with ``factor_c``), ``alpha``, ``dropout``.

    Example:
        >>> import torch
        >>> layer = LoKrLayer(nn.Linear(64, 48), rank=2, alpha=2)  # C: (6, 8), B @ A: (8, 8)
        >>> sum(p.numel() for _, p in layer.lora_parameters()) == 6 * 8 + 2 * (8 + 8)
        True
        >>> x = torch.randn(3, 64)
        >>> torch.equal(layer(x), layer.base(x))  # B starts at zero
        True
    """

    method = "lokr"

    def __init__(self, base: nn.Module, *, factor: int = -1, factor_c: bool = False, **kwargs: Any) -> None:
        super().__init__(base, **kwargs)
        rank = self.rank
        out_features, in_flat = self.matrix_shape
        (o1, o2), (i1, i2) = factorize(out_features, factor), factorize(in_flat, factor)
        self.factor = factor
        self.factor_c = bool(factor_c)
        self.kron_shapes = ((o1, i1), (o2, i2))
        weight = base.weight

        def new(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, device=weight.device, dtype=weight.dtype))

        if self.factor_c:
            self.lokr_w1_a = new(o1, rank)
            self.lokr_w1_b = new(rank, i1)
        else:
            self.lokr_w1 = new(o1, i1)
        self.lokr_w2_a = new(o2, rank)
        self.lokr_w2_b = new(rank, i2)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Kaiming-uniform ``C`` (or its factors) and ``A``, zero ``B``: the update starts at exactly zero."""
        for param in (self.lokr_w1_a, self.lokr_w1_b) if self.factor_c else (self.lokr_w1,):
            nn.init.kaiming_uniform_(param, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lokr_w2_b, a=math.sqrt(5))
        nn.init.zeros_(self.lokr_w2_a)

    def kron_c(self) -> Tensor:
        """The Kronecker factor ``C``, of shape ``(o1, i1)``."""
        return self.lokr_w1_a @ self.lokr_w1_b if self.factor_c else self.lokr_w1

    def delta_matrix(self) -> Tensor:
        """``kron(C, B @ A)``, of shape ``(out, in_flat)``."""
        return torch.kron(self.kron_c(), self.lokr_w2_a @ self.lokr_w2_b)

    def extra_repr(self) -> str:
        """Hyper-parameters, Kronecker shapes and merged state, for ``repr(model)``."""
        (o1, i1), (o2, i2) = self.kron_shapes
        return super().extra_repr() + f", kron=({o1}x{i1}) x ({o2}x{i2}), factor_c={self.factor_c}"
