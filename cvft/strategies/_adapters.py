"""Machinery shared by the weight-delta adapters (LoHA, LoKr) that reuse LoRA's wrapper, targets and export.

A :class:`DeltaWeightLayer` is a :class:`~cvft.strategies.lora.LoRALayer`, so ``merge_lora``, ``unmerge_lora``,
``export_plain_model``, ``lora_layers`` and adapter files treat it exactly like a LoRA layer. Subclasses only build
their factors and define :meth:`~DeltaWeightLayer.delta_matrix`: the unscaled update as an ``(out, in_flat)`` matrix,
where ``in_flat`` is ``in / groups * kh * kw`` for a convolution. The update is applied to inputs through the full
delta weight (``F.linear`` or the base convolution with the delta as weight), which supports grouped and depthwise
convolutions because the delta has the base weight's shape.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from cvft.errors import StrategyError
from cvft.strategies.lora.layer import LoRALayer, check_adapter_hyperparameters
from cvft.strategies.lora.strategy import AdapterStrategy, inject_adapters

__all__ = ["DeltaWeightLayer", "AdapterStrategy", "check_adapter_hyperparameters", "inject_adapters"]


class DeltaWeightLayer(LoRALayer):
    """A frozen ``nn.Linear`` or plain ``nn.Conv2d`` plus an update given as a full delta weight.

    Args:
        method: Name used in error messages (``"loha"``, ``"lokr"``).
        base: The layer to adapt; its parameters are frozen.
        rank: Rank of the low-rank factors.
        alpha: Scale numerator; the update is scaled by ``alpha / rank``.
        dropout: Dropout probability on the update's input.
    """

    def __init__(self, method: str, base: nn.Module, rank: int, alpha: float, dropout: float) -> None:
        check_adapter_hyperparameters(method, rank, alpha, dropout)
        if not (isinstance(base, nn.Linear) or type(base) is nn.Conv2d):
            raise StrategyError(
                f"{method}: can adapt nn.Linear and plain nn.Conv2d layers, got {type(base).__name__}; "
                "target a different module or leave this one out of `targets`."
            )
        super().__init__(base, rank, alpha, dropout, use_rslora=False)

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

    def extra_repr(self) -> str:
        """Hyper-parameters and merged state, for ``repr(model)``."""
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"
