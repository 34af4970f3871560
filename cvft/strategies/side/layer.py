"""Modules the ``side_module`` strategy adds beside a frozen backbone: top blocks and a side network.

* :class:`TopTransformer` (ViT): timm transformer blocks on the token sequence after the last block, with their
  LayerScale gammas at zero so that each block starts as the identity.
* :class:`TopBottleneck` (CNN): residual bottlenecks (1x1, 3x3, 1x1 convolutions with BatchNorm) on the final
  feature map, the last BatchNorm's weight at zero so that each starts as the identity. No activation follows the
  residual sum, which keeps the identity exact for features of any sign (ConvNeXt's are not post-ReLU).
* :class:`SideNetwork` (both): side-tuning (Zhang et al., ECCV 2020): a small CNN fed the input image whose
  output is pooled to the backbone's final feature shape, projected to its channels and blended as
  ``features + gate * side(image)``, with a learned scalar ``gate`` starting at 0.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TopTransformer", "TopBottleneck", "SideNetwork"]


class TopTransformer(nn.Sequential):
    """``depth`` timm ViT blocks of width ``dim`` whose LayerScale gammas start at zero (identity at init).

    Args:
        dim: Token width (the backbone's ``embed_dim``).
        num_heads: Attention heads.
        mlp_ratio: Hidden width of the MLP over ``dim``.
        depth: Number of blocks.
        qkv_bias: Whether the qkv projection has a bias.
        norm_eps: Epsilon of the blocks' LayerNorms.

    Example:
        >>> import torch
        >>> top = TopTransformer(dim=16, num_heads=2, depth=1)
        >>> tokens = torch.randn(2, 5, 16)
        >>> torch.equal(top(tokens), tokens)
        True
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        depth: int = 1,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
    ) -> None:
        from timm.models.vision_transformer import Block

        norm_layer = functools.partial(nn.LayerNorm, eps=norm_eps)
        blocks = [
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, init_values=1.0, norm_layer=norm_layer)
            for _ in range(depth)
        ]
        super().__init__(*blocks)
        with torch.no_grad():
            for block in blocks:
                block.ls1.gamma.zero_()
                block.ls2.gamma.zero_()


class _Bottleneck(nn.Module):
    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.bn3.weight)  # the residual branch starts at exactly zero

    def forward(self, x: Tensor) -> Tensor:
        branch = F.relu(self.bn1(self.conv1(x)))
        branch = F.relu(self.bn2(self.conv2(branch)))
        return x + self.bn3(self.conv3(branch))


class TopBottleneck(nn.Sequential):
    """``depth`` residual bottlenecks on an NCHW feature map; each starts as the identity (last BN weight 0).

    Args:
        channels: Channels of the feature map.
        reduction: Bottleneck width is ``max(1, channels // reduction)``.
        depth: Number of bottlenecks.

    Example:
        >>> import torch
        >>> top = TopBottleneck(channels=8, reduction=4).eval()
        >>> features = torch.randn(2, 8, 3, 3)
        >>> torch.equal(top(features), features)
        True
    """

    def __init__(self, channels: int, reduction: int = 4, depth: int = 1) -> None:
        hidden = max(1, channels // reduction)
        super().__init__(*[_Bottleneck(channels, hidden) for _ in range(depth)])


class SideNetwork(nn.Module):
    """A small CNN on the image, mapped onto the backbone's final features and blended through a zero gate.

    ``stages`` blocks of (3x3 conv with stride 2, BatchNorm, ReLU) with widths ``width * 2**i``, then an adaptive
    average pool to the feature grid and a projection (``proj``) to the feature channels. The output is
    ``features + gate * side``; ``gate`` is a learned scalar that starts at 0, so the backbone's features are
    returned unchanged at the start.

    For token features (``num_prefix_tokens`` given) the pooled side map becomes one token per patch and its
    global average is added to every prefix (class, register) token.

    Args:
        in_chans: Channels of the input image.
        channels: Channels (or token width) of the backbone's final features.
        width: Width of the first stage.
        stages: Number of stages.
        num_prefix_tokens: ``None`` for NCHW feature maps; the number of prefix tokens for token sequences.

    Example:
        >>> import torch
        >>> side = SideNetwork(in_chans=3, channels=8, width=4, stages=2)
        >>> image, features = torch.randn(2, 3, 32, 32), torch.randn(2, 8, 4, 4)
        >>> torch.equal(side(image, features), features)  # the gate starts at 0
        True
    """

    def __init__(
        self, in_chans: int, channels: int, width: int = 16, stages: int = 3, num_prefix_tokens: int | None = None
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_chans
        for index in range(stages):
            current = width * 2**index
            layers += [
                nn.Conv2d(previous, current, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(current),
                nn.ReLU(inplace=True),
            ]
            previous = current
        self.body = nn.Sequential(*layers)
        self.num_prefix_tokens = num_prefix_tokens
        self.proj: nn.Module = (
            nn.Conv2d(previous, channels, 1) if num_prefix_tokens is None else nn.Linear(previous, channels)
        )
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, image: Tensor, features: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """Blend the side output into ``features`` (NCHW, or ``(B, N, C)`` tokens on a ``grid`` of patches)."""
        side = self.body(image.to(self.gate.dtype))
        if self.num_prefix_tokens is None:
            mapped = self.proj(F.adaptive_avg_pool2d(side, features.shape[-2:]))
        else:
            if grid is None:
                raise ValueError("SideNetwork needs the patch grid for token features.")
            patches = F.adaptive_avg_pool2d(side, grid).flatten(2).transpose(1, 2)  # (B, gh * gw, width)
            prefix = side.mean(dim=(2, 3))[:, None, :].expand(-1, self.num_prefix_tokens, -1)
            mapped = self.proj(torch.cat([prefix, patches], dim=1))
        return features + self.gate * mapped.to(features.dtype)
