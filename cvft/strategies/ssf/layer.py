"""SSF wrapper: a frozen layer followed by a learned per-channel affine map ``y = scale * base(x) + shift``.

SSF (Lian et al., "Scaling & Shifting Your Features", NeurIPS 2022) follows chosen operations with a per-channel
scale and shift. We initialise ``scale = 1`` and ``shift = 0``, so a freshly wrapped model computes exactly what the
base model did; the paper's code draws ``scale ~ N(1, 0.02)`` and ``shift ~ N(0, 0.02)`` instead (``init_std``).

The channel axis depends on the layout of the base layer's output:

============================================= ============ =====================================
base layer                                    channel axis output layout
============================================= ============ =====================================
``nn.Linear``, ``nn.LayerNorm``               last         tokens ``(B, N, C)`` or NHWC
``nn.Conv2d``, ``nn.BatchNorm2d``, GroupNorm  1            NCHW
timm's ``LayerNorm2d`` (ConvNeXt)             1            NCHW (normalises over channels)
============================================= ============ =====================================

Every supported layer ends in a per-channel affine map of its own (weight/bias or affine norm parameters), so
:meth:`SSFLayer.folded` merges the SSF into it exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cvft.errors import StrategyError

__all__ = ["SSFLayer", "ssf_channel_dim", "is_ssf_supported"]


def _is_plain_conv(module: nn.Module) -> bool:
    # Conv2dSame pads dynamically and still convolves with self.weight/self.bias; weight-standardised convs do not
    return type(module) is nn.Conv2d or type(module).__name__ == "Conv2dSame"


def _is_batchnorm(module: nn.Module) -> bool:
    # timm's BatchNormAct2d applies an activation after the affine map: a following SSF could not fold into it
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and "Act" not in type(module).__name__


def is_ssf_supported(module: nn.Module) -> bool:
    """Whether an SSF can follow ``module`` and fold back into it.

    Supported: ``nn.Linear``, plain ``nn.Conv2d`` (and timm's ``Conv2dSame``), BatchNorm, GroupNorm and LayerNorm
    (timm's ``LayerNorm2d`` included) with affine parameters over one channel axis.

    Example:
        >>> is_ssf_supported(nn.Linear(2, 3)), is_ssf_supported(nn.LayerNorm(4, elementwise_affine=False))
        (True, False)
    """
    if isinstance(module, nn.Linear) or _is_plain_conv(module):
        return True
    if _is_batchnorm(module):
        return module.affine
    if isinstance(module, nn.GroupNorm):
        return module.affine
    if isinstance(module, nn.LayerNorm):
        return module.weight is not None and len(module.normalized_shape) == 1
    return False


def ssf_channel_dim(module: nn.Module) -> int:
    """Axis of ``module``'s output that holds its channels: ``-1`` for token/NHWC outputs, ``1`` for NCHW.

    Example:
        >>> ssf_channel_dim(nn.Linear(2, 3)), ssf_channel_dim(nn.BatchNorm2d(3))
        (-1, 1)
    """
    if isinstance(module, nn.LayerNorm):
        return 1 if "2d" in type(module).__name__ else -1
    return -1 if isinstance(module, nn.Linear) else 1


def _num_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[0]
    return module.num_features


class SSFLayer(nn.Module):
    """A frozen ``base`` layer followed by ``ssf_scale * y + ssf_shift`` over its channel axis.

    Args:
        base: The layer to follow (see :func:`is_ssf_supported`); its parameters are frozen.
        init_std: ``0`` (default) starts at the identity (scale 1, shift 0); ``> 0`` draws scale from
            ``N(1, init_std)`` and shift from ``N(0, init_std)`` as the paper's code does (0.02).

    Example:
        >>> import torch
        >>> layer = SSFLayer(nn.Conv2d(3, 4, 1))
        >>> x = torch.randn(2, 3, 5, 5)
        >>> torch.equal(layer(x), layer.base(x))  # scale 1, shift 0
        True
        >>> with torch.no_grad():
        ...     _ = layer.ssf_scale.fill_(2.0)
        >>> torch.allclose(layer(x), 2 * layer.base(x))
        True
        >>> expected = layer(x)
        >>> folded = layer.folded()  # the base conv, scale and shift merged in
        >>> torch.allclose(folded(x), expected)
        True
    """

    def __init__(self, base: nn.Module, init_std: float = 0.0) -> None:
        super().__init__()
        if not is_ssf_supported(base):
            raise StrategyError(
                f"ssf: cannot follow a {type(base).__name__}; SSF follows nn.Linear, plain nn.Conv2d and affine "
                "BatchNorm, GroupNorm or LayerNorm layers. Leave this module out of `targets`."
            )
        if init_std < 0:
            raise StrategyError(f"ssf: init_std must be >= 0, got {init_std!r}.")
        self.base = base
        self.channel_dim = ssf_channel_dim(base)
        channels = _num_channels(base)
        reference = next(base.parameters())
        factory = {"device": reference.device, "dtype": reference.dtype}
        self.ssf_scale = nn.Parameter(torch.ones(channels, **factory))
        self.ssf_shift = nn.Parameter(torch.zeros(channels, **factory))
        if init_std > 0:
            with torch.no_grad():
                self.ssf_scale.normal_(1.0, init_std)
                self.ssf_shift.normal_(0.0, init_std)
        for param in base.parameters():
            param.requires_grad_(False)

    def _view(self, vector: Tensor, ndim: int) -> Tensor:
        if self.channel_dim == -1:
            return vector
        shape = [1] * ndim
        shape[1] = -1
        return vector.reshape(shape)

    def forward(self, x: Tensor) -> Tensor:
        """``scale * base(x) + shift``, broadcast over the channel axis."""
        out = self.base(x)
        return out * self._view(self.ssf_scale, out.ndim) + self._view(self.ssf_shift, out.ndim)

    @torch.no_grad()
    def folded(self) -> nn.Module:
        """The base layer with the SSF merged into its parameters (in place); the wrapper is then spent.

        Linear and Conv2d: ``W' = diag(scale) W`` and ``b' = scale * b + shift``, a bias is created where the base
        had none. Norm layers: ``weight' = scale * weight`` and ``bias' = scale * bias + shift``.
        """
        base = self.base
        scale, shift = self.ssf_scale.detach(), self.ssf_shift.detach()
        weight = base.weight
        weight.mul_(scale.reshape(-1, *[1] * (weight.ndim - 1)).to(weight.dtype))
        if base.bias is None:
            # LayerNorm(bias=False) and bias-free Linear/Conv2d get a bias so that the shift has a home
            base.bias = nn.Parameter(torch.zeros_like(scale, dtype=weight.dtype), requires_grad=False)
        base.bias.mul_(scale.to(weight.dtype)).add_(shift.to(weight.dtype))
        return base

    def extra_repr(self) -> str:
        """Channel count and axis, for ``repr(model)``."""
        return f"channels={self.ssf_scale.numel()}, channel_dim={self.channel_dim}"
