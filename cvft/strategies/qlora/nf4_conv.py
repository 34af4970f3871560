"""Convolutions whose frozen weight is stored in 4-bit NormalFloat (NF4), dequantised at every forward.

torchao's ``NF4Tensor`` holds matrices (at most 2-D) whose number of values splits into whole blocks. A convolution
weight ``(out, in / groups, kh, kw)`` is stored as the ``(out, in / groups * kh * kw)`` matrix of its flattened
filters, so the blocks run along each filter as they run along a Linear weight's rows. When the number of values is
not a multiple of the block size (a 3x3 stem on 3 channels, a depthwise conv on a channel count that is not a
multiple of 64), the flattened weight is padded with zeros up to the next whole block and the padding is cut off
again after dequantisation: a zero never raises a block's absmax and NF4 codes zero exactly, so padding changes no
stored value (it costs at most one block).

Unlike ``linear_nf4``, which never keeps the dense weight, a convolution needs it for its input gradient; the
dequantised weight lives from the forward until the backward of that layer, one layer at a time.

Depthwise convolutions (``groups == in_channels``, one ``kh x kw`` filter per channel) are left dense by default
(see :data:`QUANTIZE_DEPTHWISE`): they hold well under 1 % of a ConvNeXt's or EfficientNet's convolution weights, so
4-bit storage saves almost nothing, while a 7x7 depthwise filter spans less than one NF4 block and one absmax would be
shared by unrelated channels.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from cvft.strategies._modules import adopt_conv_geometry, conv_forward, dense_conv_like
from cvft.strategies.qlora.nf4 import CopiesNF4Weights, set_nf4_weight

__all__ = ["NF4Conv2d", "QUANTIZE_DEPTHWISE", "is_depthwise"]

#: Whether :func:`~cvft.strategies.qlora.quantize_layers` stores depthwise convolutions in NF4 by default.
QUANTIZE_DEPTHWISE = False


def is_depthwise(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` has one input channel per group (a depthwise convolution).

    Example:
        >>> is_depthwise(nn.Conv2d(8, 8, 3, groups=8)), is_depthwise(nn.Conv2d(8, 8, 3))
        (True, False)
    """
    return conv.groups > 1 and conv.in_channels == conv.groups


class NF4Conv2d(CopiesNF4Weights, nn.Conv2d):
    """A frozen ``nn.Conv2d`` (or timm ``Conv2dSame``) whose weight is held in NF4; the bias stays dense.

    Args:
        conv: The convolution to quantise (its weight is read once and not kept).
        block_size: As for :class:`~cvft.strategies.qlora.NF4Linear`.
        scaler_block_size: As for :class:`~cvft.strategies.qlora.NF4Linear`.

    Example:
        >>> import torch
        >>> dense = nn.Conv2d(16, 32, 3, padding=1)
        >>> quantised = NF4Conv2d(dense)
        >>> x = torch.randn(1, 16, 8, 8)
        >>> bool((quantised(x) - dense(x)).abs().max() < 0.5)
        True
        >>> quantised.dequantize().weight.shape == dense.weight.shape
        True
    """

    def __init__(self, conv: nn.Conv2d, block_size: int = 64, scaler_block_size: int = 256) -> None:
        nn.Module.__init__(self)
        adopt_conv_geometry(self, conv)  # same_padding: the update path must pad as a Conv2dSame does
        weight = conv.weight.detach()
        self.weight_shape = tuple(weight.shape)
        flat = weight.reshape(weight.shape[0], -1)
        self.padded = (-flat.numel()) % block_size
        if self.padded:
            flat = F.pad(flat.flatten(), (0, self.padded)).unsqueeze(0)
        set_nf4_weight(self, flat.contiguous(), conv.bias, block_size, scaler_block_size)

    def dense_weight(self) -> Tensor:
        """The dequantised weight in the convolution's shape ``(out, in / groups, kh, kw)``."""
        flat = self.weight.get_original_weight().flatten()
        if self.padded:
            flat = flat[: flat.numel() - self.padded]
        return flat.reshape(self.weight_shape)

    def forward(self, x: Tensor) -> Tensor:
        """The convolution with the dequantised weight (after "same" padding for a Conv2dSame)."""
        return conv_forward(self, x, self.dense_weight())

    def dequantize(self) -> nn.Conv2d:
        """A dense convolution of the same class and geometry with the dequantised weight (what a merge folds into)."""
        return dense_conv_like(self, self.dense_weight(), self.same_padding)

    def extra_repr(self) -> str:
        """Shape and quantisation settings."""
        padded = f", padded={self.padded}" if self.padded else ""
        return super().extra_repr() + f", nf4 block_size={self.block_size}{padded}"
