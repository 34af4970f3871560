"""Module surgery that strategies share.

Replacing a sub-module by name (LoRA, adapters, SSF and sparse tuning wrap layers), and reading the width of a timm
model's pooled features (contrastive projection heads, feature distillation).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from cvft.errors import StrategyError

__all__ = ["dense_conv_like", "feature_width", "put_merged_back", "set_submodule"]


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
