"""Module surgery that strategies share.

Replacing a sub-module by name (LoRA, adapters, SSF and sparse tuning wrap layers), and reading the width of a timm
model's pooled features (contrastive projection heads, feature distillation).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from cvft.errors import StrategyError

__all__ = [
    "adopt_conv_geometry",
    "conv_forward",
    "dense_conv_like",
    "feature_width",
    "is_conv2d_same",
    "put_merged_back",
    "set_submodule",
]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the sub-module ``name`` (dotted path) of ``model`` by ``module``.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2))
        >>> set_submodule(model, "0", nn.Identity())
        >>> model
        Sequential(
          (0): Identity()
        )
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def put_merged_back(model: nn.Module, wrappers: Mapping[str, nn.Module]) -> None:
    """Replace each wrapper (by module name) with the plain layer its ``merged_base()`` gives, in place.

    Example:
        >>> class Wrapper(nn.Module):
        ...     def merged_base(self):
        ...         return nn.Identity()
        >>> model = nn.Sequential(Wrapper())
        >>> put_merged_back(model, {"0": model[0]})
        >>> type(model[0]).__name__
        'Identity'
    """
    for name, wrapper in wrappers.items():
        set_submodule(model, name, wrapper.merged_base())


def feature_width(model: nn.Module, needed_by: str = "This strategy", fix: str = "") -> int:
    """Width of a timm model's pooled pre-logit features (``forward_head(pre_logits=True)``).

    Args:
        model: A timm model (``head_hidden_size`` or ``num_features`` tells the width).
        needed_by: Who asks, for the error (``"Feature distillation"``).
        fix: What to do instead, appended to the error.

    Raises:
        StrategyError: The model reports no feature width.

    Example:
        >>> import timm
        >>> feature_width(timm.create_model("test_resnet")), feature_width(timm.create_model("test_vit"))
        (96, 64)
    """
    width = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    if not width:
        raise StrategyError(
            f"{needed_by} needs a timm model that reports its feature width (`num_features`); "
            f"{type(model).__name__} does not.{' ' + fix if fix else ''}"
        )
    return int(width)


def is_conv2d_same(module: nn.Module) -> bool:
    """Whether ``module`` is timm's ``Conv2dSame`` (TF "same" padding, computed from the input's size)."""
    return type(module).__name__ == "Conv2dSame"


def adopt_conv_geometry(module: nn.Conv2d, conv: nn.Conv2d) -> None:
    """Copy ``conv``'s geometry onto ``module``, a ``nn.Conv2d`` subclass set up by ``nn.Module.__init__`` alone.

    ``nn.Conv2d``'s methods (``_conv_forward``, ``extra_repr``) then work on ``module``; ``module.same_padding``
    records whether ``conv`` is timm's ``Conv2dSame``, which pads the input from its size at every call. What the
    quantised convolutions (NF4, fake-quantised) do before storing their own weight.

    Example:
        >>> class Bare(nn.Conv2d):
        ...     def __init__(self, conv):
        ...         nn.Module.__init__(self)
        ...         adopt_conv_geometry(self, conv)
        ...         self.weight, self.bias = conv.weight, conv.bias
        >>> Bare(nn.Conv2d(2, 4, 3, stride=2)).extra_repr()
        '2, 4, kernel_size=(3, 3), stride=(2, 2)'
    """
    for attribute in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
        setattr(module, attribute, getattr(conv, attribute))
    module.transposed, module.output_padding = False, conv.output_padding
    module.padding_mode = conv.padding_mode
    module._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice
    module.same_padding = is_conv2d_same(conv)


def conv_forward(conv: nn.Conv2d, x: Tensor, weight: Tensor) -> Tensor:
    """``conv``'s convolution of ``x`` with ``weight`` and its bias, after "same" padding where ``conv.same_padding``.

    For the convolutions set up by :func:`adopt_conv_geometry`.
    """
    if conv.same_padding:
        from timm.layers.conv2d_same import conv2d_same

        return conv2d_same(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return conv._conv_forward(x, weight, conv.bias)


def dense_conv_like(conv: nn.Conv2d, weight: Tensor, same_padding: bool = False) -> nn.Conv2d:
    """A frozen plain ``nn.Conv2d`` (timm's ``Conv2dSame`` with ``same_padding``) of ``conv``'s geometry and bias.

    What quantised convolutions (NF4, fake-quantised) give back when a merge or an export needs a dense layer.

    Example:
        >>> import torch
        >>> conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        >>> dense = dense_conv_like(conv, torch.zeros(4, 2, 3, 3))
        >>> dense.stride, dense.padding, bool(dense.weight.requires_grad)
        ((2, 2), (1, 1), False)
    """
    geometry = {"stride": conv.stride, "dilation": conv.dilation, "groups": conv.groups, "bias": conv.bias is not None}
    if same_padding:
        from timm.layers.conv2d_same import Conv2dSame

        dense: nn.Conv2d = Conv2dSame(conv.in_channels, conv.out_channels, conv.kernel_size, **geometry)
    else:
        dense = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            padding=conv.padding,
            padding_mode=conv.padding_mode,
            **geometry,
        )
    dense.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if conv.bias is not None:
        dense.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
    return dense.to(weight.device)
