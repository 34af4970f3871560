"""Bottleneck adapters and the wrappers that put them beside or after a frozen module.

A bottleneck maps features down to a narrow width, applies a non-linearity and maps them back up:
``A(x) = up(act(down(x)))``. The up projection starts at zero, so ``A(x) = 0`` and a freshly wrapped model computes
exactly what it did before. Because of the non-linearity an adapter cannot be folded into the frozen weights: the
extra modules stay in the model at inference.

Two wrappers place a bottleneck around a frozen ``base`` module (a block, a convolution, an attention or MLP
sub-layer):

* :class:`ParallelAdapter`: ``base(x) + s * A(x)`` (Conv-Adapter's parallel variants, AdaptFormer);
* :class:`SequentialAdapter`: ``y + s * A(y)`` with ``y = base(x)`` (Houlsby adapters, Conv-Adapter sequential).

``s`` is a learned per-channel or scalar scale, or a fixed number. Several wrappers may hold the *same* bottleneck
module (weight sharing); ``model.named_parameters()`` then lists its tensors once, under the first wrapper.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cvft.errors import StrategyError
from cvft.strategies._modules import set_submodule

__all__ = [
    "AdapterWrapper",
    "ConvBottleneck",
    "LinearBottleneck",
    "ParallelAdapter",
    "SequentialAdapter",
    "adapter_parameter_names",
    "adapter_wrappers",
    "bottleneck_width",
    "make_activation",
    "remove_adapters",
    "set_submodule",
]


def make_activation(name: str) -> nn.Module:
    """A fresh activation module from a timm activation name (``"relu"``, ``"gelu"``, ``"silu"`` ...).

    Raises:
        StrategyError: timm knows no activation of that name.

    Example:
        >>> make_activation("relu")
        ReLU()
    """
    from timm.layers import get_act_layer

    try:
        layer = get_act_layer(name) if isinstance(name, str) and name else None
    except (KeyError, ValueError, TypeError):
        layer = None
    if layer is None:
        raise StrategyError(f"Unknown activation {name!r}; give a timm activation name such as 'relu', 'gelu', 'silu'.")
    return layer()


def bottleneck_width(channels: int, reduction: int | None, width: int | None) -> int:
    """Width of the bottleneck: ``width`` when given, else ``channels // reduction`` and at least 1.

    Example:
        >>> bottleneck_width(64, 4, None), bottleneck_width(3, 4, None), bottleneck_width(64, None, 8)
        (16, 1, 8)
    """
    if width is not None:
        return width
    assert reduction is not None
    return max(1, channels // reduction)


class LinearBottleneck(nn.Module):
    """``up(act(down(x)))`` over the last dimension (tokens): the adapter of Houlsby et al. and AdaptFormer.

    ``down`` keeps PyTorch's default Kaiming-uniform initialisation with a zero bias, ``up`` is all zeros.

    Args:
        in_features: Features of the input.
        out_features: Features of the output.
        width: Bottleneck width.
        act: timm activation name.

    Example:
        >>> import torch
        >>> adapter = LinearBottleneck(64, 64, width=8, act="gelu")
        >>> sum(p.numel() for p in adapter.parameters()) == 64 * 8 + 8 + 8 * 64 + 64
        True
        >>> bool(adapter(torch.randn(2, 5, 64)).eq(0).all())
        True
    """

    def __init__(self, in_features: int, out_features: int, width: int, act: str = "gelu") -> None:
        super().__init__()
        self.down = nn.Linear(in_features, width)
        self.act = make_activation(act)
        self.up = nn.Linear(width, out_features)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``up(act(down(x)))``."""
        return self.up(self.act(self.down(x)))


class ConvBottleneck(nn.Module):
    """The Conv-Adapter bottleneck on ``NCHW`` feature maps.

    ``kind="depthwise"`` (the paper's depth-wise separable form): a depthwise ``k x k`` convolution (no bias) that
    carries the spatial kernel and the stride, then a 1x1 ``down`` to ``width`` channels, the activation and a 1x1
    ``up``. ``kind="pointwise"``: a 1x1 ``down`` with the stride, the activation and a 1x1 ``up``. ``up`` starts at
    zero.

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output.
        width: Bottleneck width.
        kind: ``"depthwise"`` or ``"pointwise"``.
        kernel_size: Kernel of the depthwise convolution.
        stride: Stride that brings the input to the output's resolution.
        padding: Padding of the depthwise convolution; ``None`` pads ``dilation * (k - 1) // 2``.
        dilation: Dilation of the depthwise convolution.
        same_padding: Pad dynamically like TensorFlow's "same" (timm's ``Conv2dSame``) instead of ``padding``.
        act: timm activation name.

    Example:
        >>> import torch
        >>> adapter = ConvBottleneck(8, 16, width=2, kind="depthwise", kernel_size=3, stride=2)
        >>> sum(p.numel() for p in adapter.parameters()) == 8 * 3 * 3 + (8 * 2 + 2) + (2 * 16 + 16)
        True
        >>> adapter(torch.randn(1, 8, 10, 10)).shape
        torch.Size([1, 16, 5, 5])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        width: int,
        kind: str = "depthwise",
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str | None = None,
        dilation: int | tuple[int, int] = 1,
        same_padding: bool = False,
        act: str = "relu",
    ) -> None:
        super().__init__()
        self.kind = kind
        if kind == "depthwise":
            if same_padding:
                from timm.layers import Conv2dSame

                self.depthwise: nn.Module = Conv2dSame(
                    in_channels, in_channels, kernel_size, stride, dilation=dilation, groups=in_channels, bias=False
                )
            else:
                if padding is None:
                    k = kernel_size if isinstance(kernel_size, tuple) else (kernel_size, kernel_size)
                    d = dilation if isinstance(dilation, tuple) else (dilation, dilation)
                    padding = (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
                self.depthwise = nn.Conv2d(
                    in_channels, in_channels, kernel_size, stride, padding, dilation, groups=in_channels, bias=False
                )
            self.down = nn.Conv2d(in_channels, width, 1)
        elif kind == "pointwise":
            self.depthwise = nn.Identity()
            self.down = nn.Conv2d(in_channels, width, 1, stride=stride)
        else:
            raise StrategyError(f"Unknown adapter kind {kind!r}; use 'depthwise' or 'pointwise'.")
        nn.init.zeros_(self.down.bias)
        self.act = make_activation(act)
        self.up = nn.Conv2d(width, out_channels, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``up(act(down(depthwise(x))))``."""
        return self.up(self.act(self.down(self.depthwise(x))))


class AdapterWrapper(nn.Module):
    """A frozen ``base`` module and a bottleneck ``adapter`` with its scale ``s``.

    Args:
        base: The frozen module (its parameters are not touched here).
        adapter: The bottleneck; the same instance may be shared by several wrappers.
        scale: Initial value of ``s``.
        scale_shape: Shape of a learned ``s`` (``()`` scalar, ``(C, 1, 1)`` per channel of a feature map,
            ``(C,)`` per token feature); ``None`` keeps ``s`` a fixed number.

    Example:
        >>> wrapper = SequentialAdapter(nn.Conv2d(4, 4, 3), ConvBottleneck(4, 4, 2, "pointwise"), scale_shape=(4, 1, 1))
        >>> wrapper.adapter_parameter_names()
        ['scale', 'adapter.down.weight', 'adapter.down.bias', 'adapter.up.weight', 'adapter.up.bias']
    """

    placement = "wrapper"

    def __init__(
        self, base: nn.Module, adapter: nn.Module, scale: float = 1.0, scale_shape: tuple[int, ...] | None = ()
    ) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.scale: Tensor | float
        if scale_shape is None:
            self.scale = float(scale)
        else:
            like = next(base.parameters(), None)
            kwargs = {"device": like.device, "dtype": like.dtype} if like is not None else {}
            self.scale = nn.Parameter(torch.full(scale_shape, float(scale), **kwargs))

    def adapter_parameter_names(self) -> list[str]:
        """Names, relative to this wrapper, of the adapter's and the scale's parameters (``base`` excluded)."""
        return [name for name, _ in self.named_parameters(remove_duplicate=False) if not name.startswith("base.")]

    def extra_repr(self) -> str:
        """The placement and the scale, for ``repr(model)``."""
        scale = f"{self.scale:g}" if isinstance(self.scale, float) else f"learned {tuple(self.scale.shape)}"
        return f"placement={self.placement}, scale={scale}"


class ParallelAdapter(AdapterWrapper):
    """``base(x, ...) + s * adapter(x)``: the adapter runs beside ``base`` on the same input.

    Extra positional and keyword arguments go to ``base`` only (an attention mask, for instance).

    Example:
        >>> import torch
        >>> wrapped = ParallelAdapter(nn.Linear(4, 4), LinearBottleneck(4, 4, 2), scale=0.1, scale_shape=None)
        >>> x = torch.randn(3, 4)
        >>> torch.equal(wrapped(x), wrapped.base(x))
        True
    """

    placement = "parallel"

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """``base(x) + s * adapter(x)``; the adapter runs first, before ``base`` could modify ``x`` in place."""
        delta = self.adapter(x)
        return self.base(x, *args, **kwargs) + self.scale * delta


class SequentialAdapter(AdapterWrapper):
    """``y + s * adapter(y)`` with ``y = base(x, ...)``: the adapter, with its own residual, follows ``base``.

    Example:
        >>> import torch
        >>> wrapped = SequentialAdapter(nn.Linear(4, 6), LinearBottleneck(6, 6, 2), scale_shape=(6,))
        >>> x = torch.randn(3, 4)
        >>> torch.equal(wrapped(x), wrapped.base(x))
        True
    """

    placement = "sequential"

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """``y + s * adapter(y)``."""
        y = self.base(x, *args, **kwargs)
        return y + self.scale * self.adapter(y)


def adapter_wrappers(model: nn.Module) -> dict[str, AdapterWrapper]:
    """Every adapter wrapper in ``model``, by module name.

    Example:
        >>> import timm
        >>> from cvft.strategies import build_strategy
        >>> model = timm.create_model("test_resnet")
        >>> build_strategy({"name": "conv_adapter", "train_head": False}).setup(model)
        >>> list(adapter_wrappers(model))[:2]
        ['layer1.0.conv1', 'layer1.0.conv2']
    """
    return {name: module for name, module in model.named_modules() if isinstance(module, AdapterWrapper)}


def adapter_parameter_names(model: nn.Module) -> set[str]:
    """Names (as ``model.named_parameters()`` lists them) of every adapter and scale parameter in ``model``.

    A bottleneck shared by several wrappers is listed once, under the first wrapper that holds it.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> set_submodule(model, "0", SequentialAdapter(model[0], LinearBottleneck(4, 4, 2), scale_shape=()))
        >>> sorted(adapter_parameter_names(model))
        ['0.adapter.down.bias', '0.adapter.down.weight', '0.adapter.up.bias', '0.adapter.up.weight', '0.scale']
    """
    ids = set()
    for wrapper in adapter_wrappers(model).values():
        ids.update(id(p) for name, p in wrapper.named_parameters() if not name.startswith("base."))
    return {name for name, p in model.named_parameters() if id(p) in ids}


def remove_adapters(model: nn.Module) -> nn.Module:
    """Put every wrapped module back in place of its wrapper (dropping the adapters); return ``model``.

    Adapters are non-linear and cannot be merged into the frozen weights; this gives back the original model.

    Example:
        >>> import timm
        >>> from cvft.strategies import build_strategy
        >>> model = timm.create_model("test_vit", img_size=32)
        >>> keys = list(model.state_dict())
        >>> build_strategy({"name": "vit_adapter", "width": 4, "train_head": False}).setup(model)
        >>> list(remove_adapters(model).state_dict()) == keys
        True
    """
    while wrappers := adapter_wrappers(model):
        name = max(wrappers, key=lambda n: n.count("."))  # innermost first
        set_submodule(model, name, wrappers[name].base)
    return model
