"""The low-rank layer base: a frozen base layer plus a trainable update ``scaling * delta`` that folds into it.

Every low-rank method (LoRA, LoHA, LoKr, shared LoRA, QLoRA) wraps one ``nn.Linear`` or ``nn.Conv2d`` in a
:class:`LowRankLayer`. The base layer is frozen; the method defines the update as a weight in the base weight's shape
(:meth:`LowRankLayer.delta_weight`) and as a map applied to inputs (:meth:`LowRankLayer.lora_forward`, named after
LoRA, where the family started). The base class owns what the family shares: hyper-parameter checks, scaling,
dropout on the update path, and folding the update into the base weight (:meth:`~LowRankLayer.merge`) and out again
(:meth:`~LowRankLayer.unmerge`), so one merge serves every method.

Convolutions can train through the updated weight: ``conv(x, W + scaling * delta)`` is one convolution, where the
branch ``base(x) + scaling * update(x)`` is two or three. Both compute the same function; the gradients reach the
factors through ``delta_weight``. The fused form keeps the updated weight for backward, the branch keeps the
update's intermediate activations, so each layer takes the one that keeps less (:meth:`LowRankLayer.prefers_fused`):
LoHA/LoKr's branch is a second full convolution and always loses; LoRA's rank-``r`` branch wins on small, deep
feature maps and loses on large ones, where its memory-bound rank-``r`` convolutions are also the slow part of a
CPU step. Linear layers keep the branch (on tokens it is the cheaper of the two), and so does any layer with dropout
on the update's input, which has no weight form.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import Tensor, nn

from cvft.errors import StrategyError
from cvft.strategies._modules import is_conv2d_same

__all__ = ["LowRankLayer", "check_low_rank_hyperparameters", "low_rank_scaling"]


def check_low_rank_hyperparameters(method: str, rank: int, alpha: float, dropout: float) -> None:
    """Refuse a non-positive or non-integer rank, ``alpha <= 0`` and dropout outside ``[0, 1)``, naming ``method``.

    Example:
        >>> check_low_rank_hyperparameters("loha", 0, 1.0, 0.0)
        Traceback (most recent call last):
        ...
        cvft.errors.StrategyError: loha: rank must be a positive integer, got 0.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise StrategyError(f"{method}: rank must be a positive integer, got {rank!r}.")
    if not alpha > 0:
        raise StrategyError(f"{method}: alpha must be > 0, got {alpha!r}.")
    if not 0.0 <= dropout < 1.0:
        raise StrategyError(f"{method}: dropout must be in [0, 1), got {dropout!r}.")


def low_rank_scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    """``alpha / rank``, or ``alpha / sqrt(rank)`` for rank-stabilised scaling (rsLoRA).

    Example:
        >>> low_rank_scaling(4, 8, use_rslora=False), low_rank_scaling(4, 8, use_rslora=True)
        (2.0, 4.0)
    """
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def is_quantized_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a convolution held quantised (QLoRA's NF4, QAT's fake-quantised weight).

    Such a layer computes a plain convolution of its own and gives a dense copy of itself through ``dequantize()``,
    which :meth:`LowRankLayer.merge` folds the update into (and :meth:`LowRankLayer.unmerge` throws away again).

    Example:
        >>> is_quantized_conv(nn.Conv2d(2, 2, 1))
        False
    """
    return isinstance(module, nn.Conv2d) and callable(getattr(module, "dequantize", None))


class LowRankLayer(nn.Module):
    """Common part of the low-rank wrappers: the frozen ``base`` layer, scaling, dropout and the merged state.

    Subclasses set :attr:`method`, may refuse base layers they cannot wrap (:meth:`check_base`), build their factors
    and define :meth:`delta_weight` (the update in the base weight's shape, without scaling) and :meth:`lora_forward`
    (the update applied to an input, without scaling).

    Args:
        base: The layer to adapt; its parameters are frozen.
        rank: Rank ``r`` of the update.
        alpha: Scale numerator.
        dropout: Dropout probability on the input of the update path.
        use_rslora: Scale by ``alpha / sqrt(rank)`` instead of ``alpha / rank``.
    """

    #: Name of the method in error messages (``"lora"``, ``"loha"`` ...).
    method: ClassVar[str] = "low_rank"
    #: Apply the update to a convolution as ``conv(x, W + scaling * delta)`` rather than as a branch (see above).
    fuse_conv_update: ClassVar[bool] = True

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float, use_rslora: bool = False) -> None:
        super().__init__()
        self.check_base(base)
        check_low_rank_hyperparameters(self.method, rank, alpha, dropout)
        self.base = base
        self.rank = rank
        self.alpha = float(alpha)
        self.use_rslora = bool(use_rslora)
        self.scaling = low_rank_scaling(rank, alpha, use_rslora)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        for param in base.parameters():
            param.requires_grad_(False)

    def check_base(self, base: nn.Module) -> None:
        """Refuse a base layer this method cannot wrap (raise :class:`~cvft.errors.StrategyError`)."""

    def lora_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The update's own parameters (everything outside ``base``), with names relative to this layer."""
        for name, param in self.named_parameters():
            if not name.startswith("base."):
                yield name, param

    def delta_weight(self) -> Tensor:
        """The unscaled update in the shape of ``base.weight``."""
        raise NotImplementedError

    def lora_forward(self, x: Tensor) -> Tensor:
        """The unscaled update applied to ``x`` (after dropout)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """``base(x) + scaling * update(dropout(x))``; only ``base(x)`` once merged.

        A convolution without dropout computes this as one convolution with the updated weight.
        """
        if self.merged:
            return self.base(x)
        if self.fuses_update() and self.prefers_fused(x):
            weight = self.base.weight
            return self.conv_with_weight(x, weight + (self.scaling * self.delta_weight()).to(weight.dtype))
        return self.base(x) + self.scaling * self.lora_forward(self.lora_dropout(x))

    def fuses_update(self) -> bool:
        """Whether the layer can run as the base convolution with the updated weight (a convolution, no dropout)."""
        return (
            self.fuse_conv_update
            and isinstance(self.lora_dropout, nn.Identity)
            and (type(self.base) is nn.Conv2d or is_conv2d_same(self.base))
        )

    def prefers_fused(self, x: Tensor) -> bool:
        """For an input ``x``, whether the fused form keeps no more for backward than the branch (here: always)."""
        return True

    def conv_with_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        """The base convolution (its bias, stride, padding, dilation, groups) applied with ``weight``."""
        base = self.base
        if type(base) is nn.Conv2d:
            return base._conv_forward(x, weight, base.bias)
        from timm.layers.conv2d_same import conv2d_same  # timm's dynamic TF "same" padding

        return conv2d_same(x, weight, base.bias, base.stride, base.padding, base.dilation, base.groups)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``scaling * delta_weight()`` into ``base.weight``; merging a merged layer does nothing.

        A quantised base (QLoRA's :class:`~cvft.strategies.qlora.NF4Linear`) is first dequantised into a dense
        layer; the quantised one is kept aside so that :meth:`unmerge` restores it exactly.
        """
        if self.merged:
            return
        delta = self.scaling * self.delta_weight()
        dequantize = getattr(self.base, "dequantize", None)
        if callable(dequantize):
            object.__setattr__(self, "_quantized_base", self.base)  # not a registered sub-module
            self.base = dequantize()
        weight = self.base.weight
        weight.add_(delta.to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of ``base.weight`` again; unmerging an unmerged layer does nothing."""
        if not self.merged:
            return
        quantized = self.__dict__.pop("_quantized_base", None)
        if quantized is not None:
            self.base = quantized
        else:
            weight = self.base.weight
            weight.sub_((self.scaling * self.delta_weight()).to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        """Hyper-parameters and merged state, for ``repr(model)``."""
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"
