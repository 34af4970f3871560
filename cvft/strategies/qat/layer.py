"""Layers that train through int8 fake quantisation: torchao's ``FakeQuantizedLinear`` and a Conv2d counterpart.

Both keep the original layer's parameters (the same tensors, so trainability carries over) and its state-dict keys,
and fake-quantise the weight (and optionally the input) at every forward. ``dequantize()`` gives a frozen dense layer
holding the fake-quantised weight: what a LoRA merge folds its update into (see
:meth:`~cvft.strategies.lowrank.LowRankLayer.merge`), exact for weight-only QAT. ``to_float()`` is torchao's
"convert" step: the plain layer with the trained float weights, ready for real int8 quantisation (which then computes
exactly what the fake-quantised weights computed).

This module imports torchao; :mod:`cvft.strategies.qat` imports it only when the strategy is set up.
"""

from __future__ import annotations

from torch import Tensor, nn

from cvft.strategies._modules import adopt_conv_geometry, conv_forward, dense_conv_like
from cvft.strategies.qat.fake_quant import (
    PerPixelFakeQuantizer,
    activation_fake_quantizer,
    require_torchao_qat,
    weight_fake_quantizer,
)

__all__ = ["QATConv2d", "QATLinear", "make_qat_layer"]

FakeQuantizedLinear = require_torchao_qat().FakeQuantizedLinear


class QATLinear(FakeQuantizedLinear):
    """torchao's ``FakeQuantizedLinear`` built over an existing ``nn.Linear``'s parameters.

    Args:
        linear: The layer to fake-quantise; its ``weight`` and ``bias`` tensors are shared, not copied.
        activations: ``None`` (weights only) or ``"per_token"`` (see :mod:`cvft.strategies.qat.fake_quant`).

    Example:
        >>> import torch
        >>> dense = nn.Linear(8, 4)
        >>> layer = QATLinear(dense)
        >>> layer.weight is dense.weight
        True
        >>> x = torch.randn(2, 8)
        >>> torch.equal(layer(x), layer.dequantize()(x))
        True
    """

    def __init__(self, linear: nn.Linear, activations: str | None = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.activation_fake_quantizer = activation_fake_quantizer(activations)
        self.weight_fake_quantizer = weight_fake_quantizer()
        self.activations = activations

    def fake_quantized_weight(self) -> Tensor:
        """The weight rounded to its int8 grid (per-channel symmetric), with a straight-through gradient."""
        return self.weight_fake_quantizer(self.weight)

    def dequantize(self) -> nn.Linear:
        """A frozen ``nn.Linear`` holding the fake-quantised weight (the activations are no longer fake-quantised)."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        dense.weight = nn.Parameter(self.fake_quantized_weight().detach().clone(), requires_grad=False)
        if self.bias is not None:
            dense.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return dense.to(self.weight.device)

    def to_float(self) -> nn.Linear:
        """The plain ``nn.Linear`` over the same (float, trained) parameters: torchao's convert step."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight, plain.bias = self.weight, self.bias
        return plain

    def extra_repr(self) -> str:
        """Shape and quantisation settings."""
        return super().extra_repr() + f", int8 per-channel weights, activations={self.activations}"


class QATConv2d(nn.Conv2d):
    """A convolution (plain or timm ``Conv2dSame``) whose weight, and optionally input, are int8 fake-quantised.

    The weight goes through torchao's per-channel fake quantiser as its ``(out, in / groups * kh * kw)`` matrix; the
    input, with ``activations="per_token"``, one token per pixel.

    Args:
        conv: The convolution to fake-quantise; its ``weight`` and ``bias`` tensors are shared, not copied.
        activations: ``None`` (weights only) or ``"per_token"``.

    Example:
        >>> import torch
        >>> conv = nn.Conv2d(4, 8, 3, padding=1)
        >>> layer = QATConv2d(conv)
        >>> x = torch.randn(1, 4, 5, 5)
        >>> torch.equal(layer(x), layer.dequantize()(x))
        True
    """

    def __init__(self, conv: nn.Conv2d, activations: str | None = None) -> None:
        nn.Module.__init__(self)
        adopt_conv_geometry(self, conv)
        self.weight, self.bias = conv.weight, conv.bias
        quantizer = activation_fake_quantizer(activations)
        self.activation_fake_quantizer = None if quantizer is None else PerPixelFakeQuantizer(quantizer)
        self.weight_fake_quantizer = weight_fake_quantizer()
        self.activations = activations

    def fake_quantized_weight(self) -> Tensor:
        """The weight rounded to its int8 grid (one scale per output channel), with a straight-through gradient."""
        return self.weight_fake_quantizer(self.weight.reshape(self.out_channels, -1)).reshape(self.weight.shape)

    def forward(self, x: Tensor) -> Tensor:
        """The convolution of the (fake-quantised) input with the fake-quantised weight."""
        if self.activation_fake_quantizer is not None:
            x = self.activation_fake_quantizer(x)
        return conv_forward(self, x, self.fake_quantized_weight())

    def dequantize(self) -> nn.Conv2d:
        """A frozen dense convolution holding the fake-quantised weight (inputs no longer fake-quantised)."""
        return dense_conv_like(self, self.fake_quantized_weight().detach(), self.same_padding)

    def to_float(self) -> nn.Conv2d:
        """The plain convolution over the same (float, trained) parameters: torchao's convert step."""
        plain = dense_conv_like(self, self.weight.detach(), self.same_padding)
        plain.weight, plain.bias = self.weight, self.bias
        return plain

    def extra_repr(self) -> str:
        """Geometry and quantisation settings."""
        return super().extra_repr() + f", int8 per-channel weights, activations={self.activations}"


def make_qat_layer(layer: nn.Module, activations: str | None = None) -> nn.Module:
    """The fake-quantised counterpart of an ``nn.Linear`` or ``nn.Conv2d`` (timm's ``Conv2dSame`` included).

    Example:
        >>> type(make_qat_layer(nn.Linear(4, 2))).__name__, type(make_qat_layer(nn.Conv2d(2, 2, 1))).__name__
        ('QATLinear', 'QATConv2d')
    """
    if isinstance(layer, nn.Linear):
        return QATLinear(layer, activations)
    return QATConv2d(layer, activations)
