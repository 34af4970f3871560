"""Shared LoRA: one trainable low-rank pair per weight shape, reused by every adapted layer, and a scale per layer.

This is the tied-weights variant of Tied-LoRA (Renduchintala et al., NAACL 2024): ``A`` and ``B`` are trained and
tied across layers of the same shape, and each layer learns a scalar scale ``s_l`` (Tied-LoRA learns per-layer
vectors; VeRA instead freezes random shared factors and trains per-layer vectors). The update of layer ``l`` is
``scaling * s_l * B @ A``. ``B`` starts at zero and ``s_l`` at one, so the model is unchanged at the start and every
factor receives a gradient once ``B`` has moved.

The per-layer wrapper is a :class:`~cvft.strategies.lowrank.DeltaWeightLayer`, so ``merge_low_rank``,
``unmerge_low_rank``, ``export_plain_model`` and adapter files treat it as every other low-rank layer. The shared
pair is a sub-module of every layer that uses it; ``named_parameters()`` yields each shared tensor once, under the
name of the *first* layer of its shape group in model order (e.g. ``blocks.0.attn.qkv.shared.lora_A``), which is
the name adapter files store.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvft.errors import StrategyError
from cvft.strategies.lowrank import DeltaWeightLayer

__all__ = ["SharedLowRankPair", "SharedLoRALayer"]


class SharedLowRankPair(nn.Module):
    """The factors ``A`` (``rank x in_flat``, Kaiming-uniform) and ``B`` (``out x rank``, zero) of one shape group.

    Args:
        out_features: Rows of the adapted weights seen as matrices.
        in_flat: Columns (``in / groups * kh * kw`` for convolutions).
        rank: Rank of the update.
        device: Device of the factors.
        dtype: Dtype of the factors.

    Example:
        >>> pair = SharedLowRankPair(6, 4, rank=2)
        >>> pair.lora_A.shape, pair.lora_B.shape, bool(pair.lora_B.any())
        (torch.Size([2, 4]), torch.Size([6, 2]), False)
    """

    def __init__(
        self,
        out_features: int,
        in_flat: int,
        rank: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_flat, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def extra_repr(self) -> str:
        """Shapes, for ``repr(model)``."""
        return f"out={self.lora_B.shape[0]}, in={self.lora_A.shape[1]}, rank={self.lora_A.shape[0]}"


class SharedLoRALayer(DeltaWeightLayer):
    """A frozen ``nn.Linear`` or plain ``nn.Conv2d`` plus ``scaling * lora_scale * B @ A`` from a shared pair.

    Args:
        base: The layer to adapt; its parameters are frozen.
        shared: The pair of the layer's shape group (``lora_B @ lora_A`` has the shape of the weight matrix).
        alpha: Scale numerator; the update is scaled by ``alpha / rank``.
        dropout: Dropout probability on the update's input.

    Example:
        >>> import torch
        >>> pair = SharedLowRankPair(5, 4, rank=2)
        >>> first, second = SharedLoRALayer(nn.Linear(4, 5), pair), SharedLoRALayer(nn.Linear(4, 5), pair)
        >>> first.shared.lora_A is second.shared.lora_A
        True
        >>> x = torch.randn(3, 4)
        >>> torch.equal(first(x), first.base(x))  # B starts at zero
        True
    """

    method = "shared_lora"

    def __init__(self, base: nn.Module, shared: SharedLowRankPair, alpha: float = 16, dropout: float = 0.0) -> None:
        super().__init__(base, shared.lora_A.shape[0], alpha, dropout)
        if (shared.lora_B.shape[0], shared.lora_A.shape[1]) != self.matrix_shape:
            raise StrategyError(
                f"shared_lora: a pair for {tuple(shared.lora_B.shape[:1]) + tuple(shared.lora_A.shape[1:])} weights "
                f"cannot adapt a {type(base).__name__} whose weight matrix is {self.matrix_shape}."
            )
        self.shared = shared
        weight = base.weight
        self.lora_scale = nn.Parameter(torch.ones(1, device=weight.device, dtype=weight.dtype))

    def delta_matrix(self) -> Tensor:
        """``lora_scale * B @ A``, of shape ``(out, in_flat)``."""
        return self.lora_scale * (self.shared.lora_B @ self.shared.lora_A)

    def lora_forward(self, x: Tensor) -> Tensor:
        """Linear layers go through the rank-``r`` bottleneck; convolutions through the full delta weight."""
        if isinstance(self.base, nn.Linear):
            return self.lora_scale * F.linear(F.linear(x, self.shared.lora_A), self.shared.lora_B)
        return super().lora_forward(x)
