"""torchao's fake quantisers for int8 quantisation-aware training: the weight and activation settings cvft uses.

Weights: int8, symmetric, one scale per output channel (torchao's ``IntxFakeQuantizeConfig(torch.int8,
"per_channel", is_symmetric=True)``), the scheme of ``Int8WeightOnlyConfig`` and of the weights of
``Int8DynamicActivationInt8WeightConfig``. A convolution weight is fake-quantised as the ``(out, in / groups * kh *
kw)`` matrix of its flattened filters, so each output channel keeps one scale as for a Linear layer.

Activations (optional): int8, asymmetric, one scale and zero point per token (``"per_token"``): per row of a Linear
layer's input, and per pixel (across channels) of a convolution's input. torchao's QAT fake quantisers have no
per-tensor activation setting, and its int8 dynamic-activation inference quantises per token, so cvft offers the one
that training and export share.

Gradients: torchao's fake quantisation is a straight-through estimator: the gradient passes unchanged to every value
inside a channel's range and is zero at its edge (the channel's absmax, which torchao's symmetric scale
``absmax / 127.5`` puts half a step outside ``[-128, 127]``, is clipped).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from cvft.errors import StrategyError

__all__ = ["ACTIVATION_SCHEMES", "PerPixelFakeQuantizer", "activation_fake_quantizer", "require_torchao_qat",
           "weight_fake_quantizer"]  # fmt: skip

#: Activation fake-quantisation schemes ``qat`` offers (``None``: weights only).
ACTIVATION_SCHEMES = ("per_token",)


def require_torchao_qat() -> Any:
    """The ``torchao.quantization.qat`` module, or a :class:`~cvft.errors.StrategyError` saying how to install it.

    Example:
        >>> require_torchao_qat().IntxFakeQuantizer.__name__
        'IntxFakeQuantizer'
    """
    try:
        from torchao.quantization import qat
    except ImportError as err:
        raise StrategyError(
            "qat fake-quantises through torchao, which is not installed. "
            "Install it with `pip install 'cvft[qlora]'` (or `pip install torchao`)."
        ) from err
    return qat


def weight_fake_quantizer() -> nn.Module:
    """A torchao fake quantiser for 2-D weights: int8, symmetric, per output channel (row)."""
    qat = require_torchao_qat()
    import torch

    return qat.IntxFakeQuantizer(qat.IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True))


def activation_fake_quantizer(scheme: str | None) -> nn.Module | None:
    """A torchao fake quantiser for inputs (int8, asymmetric, per token), or ``None`` for ``scheme=None``.

    Example:
        >>> activation_fake_quantizer("per_tensor")
        Traceback (most recent call last):
        ...
        cvft.errors.StrategyError: qat: activations must be None (weights only) or one of ('per_token',), \
got 'per_tensor'.
    """
    if scheme is None:
        return None
    if scheme not in ACTIVATION_SCHEMES:
        raise StrategyError(
            f"qat: activations must be None (weights only) or one of {ACTIVATION_SCHEMES}, got {scheme!r}."
        )
    qat = require_torchao_qat()
    import torch

    return qat.IntxFakeQuantizer(qat.IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False))


class PerPixelFakeQuantizer(nn.Module):
    """Per-token fake quantisation of an ``(N, C, H, W)`` input, each pixel's channel vector being one token.

    Args:
        quantizer: A per-token fake quantiser (see :func:`activation_fake_quantizer`).

    Example:
        >>> import torch
        >>> fq = PerPixelFakeQuantizer(activation_fake_quantizer("per_token"))
        >>> fq(torch.randn(2, 3, 4, 4)).shape
        torch.Size([2, 3, 4, 4])
    """

    def __init__(self, quantizer: nn.Module) -> None:
        super().__init__()
        self.quantizer = quantizer

    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantise ``x`` with one scale and zero point per ``(n, h, w)`` position."""
        return self.quantizer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
