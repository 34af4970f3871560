"""Low-rank layers whose update is built as a full delta weight (LoHA, LoKr, shared LoRA).

Subclasses only build their factors and define :meth:`~DeltaWeightLayer.delta_matrix`: the unscaled update as an
``(out, in_flat)`` matrix, where ``in_flat`` is ``in / groups * kh * kw`` for a convolution. The update is applied
to inputs through the full delta weight (``F.linear``, or the base convolution with the delta as weight), which
supports grouped and depthwise convolutions because the delta has the base weight's shape.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from cvft.errors import StrategyError
from cvft.strategies.lowrank.layer import LowRankLayer

__all__ = ["DeltaWeightLayer"]


class DeltaWeightLayer(LowRankLayer):
    """A frozen ``nn.Linear`` or plain ``nn.Conv2d`` plus an update given as a full delta weight.

    The arguments and their defaults are the family's, documented here once; a subclass declares only the options it
    adds (keyword-only) and forwards these with ``**kwargs`` (:class:`~cvft.strategies.lokr.LoKrLayer` does).

    Args:
        base: The layer to adapt; its parameters are frozen.
        rank: Rank of the low-rank factors.
        alpha: Scale numerator; the update is scaled by ``alpha / rank``.
        dropout: Dropout probability on the update's input.
    """

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16, dropout: float = 0.0) -> None:
        super().__init__(base, rank, alpha, dropout, use_rslora=False)

    def check_base(self, base: nn.Module) -> None:
        """Refuse anything but ``nn.Linear`` and plain ``nn.Conv2d`` layers."""
        if not (isinstance(base, nn.Linear) or type(base) is nn.Conv2d):
            raise StrategyError(
                f"{self.method}: can adapt nn.Linear and plain nn.Conv2d layers, got {type(base).__name__}; "
                "target a different module or leave this one out of `targets`."
            )

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(out, in_flat)``: the base weight seen as a matrix."""
        weight = self.base.weight
        return weight.shape[0], weight[0].numel()

    def delta_matrix(self) -> Tensor:
        """The unscaled update as an ``(out, in_flat)`` matrix."""
        raise NotImplementedError

    def delta_weight(self) -> Tensor:
        """The unscaled update in the shape of ``base.weight``."""
        return self.delta_matrix().reshape(self.base.weight.shape)

    def lora_forward(self, x: Tensor) -> Tensor:
        """The unscaled update applied to ``x``: a linear map or a convolution with the base's geometry."""
        delta = self.delta_weight()
        if isinstance(self.base, nn.Linear):
            return F.linear(x, delta)
        return self.base._conv_forward(x, delta, None)
