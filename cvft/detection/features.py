"""Multi-scale features for detection from any timm backbone: feature levels, a ViTDet simple pyramid, an FPN.

The backbone stays the *whole* timm model (created with ``num_classes=0``). Its feature maps come from timm's
``forward_intermediates(x, indices=..., intermediates_only=True)``, the same feature contract as
``features_only=True``, but on the model itself: parameter names, ``group_matcher`` layer groups and the blocks stay
those of the classifier, so every cvft strategy (``linear_probe``, ``lora``, adapters, ``gradual_unfreeze``,
``layerwise_lr`` ...) applies by the same names and adapter files transfer between classification and detection.

* CNNs (``feature_info`` with several reductions): by default the last three levels (strides 8, 16, 32) feed a
  torchvision :class:`~torchvision.ops.FeaturePyramidNetwork`.
* Plain ViTs (every level at the same reduction): the last block's output feeds a :class:`SimpleFeaturePyramid`
  (ViTDet, Li et al. 2022), which builds strides 4-32 from the single stride-16 map without a top-down path.

Extra levels (P6/P7 for FCOS and RetinaNet, a max-pooled level for Faster R-CNN) are torchvision
``ExtraFPNBlock`` modules, appended by both necks alike.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import torch
from timm.layers import LayerNorm2d
from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork

from cvft.errors import CvftError

__all__ = [
    "VITDET_SCALES",
    "FeatureLevels",
    "feature_levels",
    "SimpleFeaturePyramid",
    "build_neck",
    "neck_strides",
    "MultiScaleFeatures",
]

#: ViTDet's scale factors: stride 16 -> strides 4, 8, 16, 32.
VITDET_SCALES: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)


class FeatureLevels(NamedTuple):
    """The backbone levels a detector reads.

    Attributes:
        indices: ``feature_info`` indices passed to ``forward_intermediates`` (non-negative, increasing).
        channels: Channels of each level.
        strides: Reduction (stride in pixels) of each level.
        is_vit: Whether the backbone is a plain ViT (one reduction for all levels, one level read).

    Example:
        >>> FeatureLevels([2, 3, 4], [48, 192, 96], [8, 16, 32], False).strides
        [8, 16, 32]
    """

    indices: list[int]
    channels: list[int]
    strides: list[int]
    is_vit: bool


def feature_levels(backbone: nn.Module, out_indices: Sequence[int] | None = None) -> FeatureLevels:
    """Choose the levels of a timm ``backbone`` to read (negative indices count from the last level).

    Args:
        backbone: A timm model with ``feature_info`` and ``forward_intermediates``.
        out_indices: ``feature_info`` indices. ``None``: the last three levels of a CNN, the last block of a ViT.
            A ViT reads exactly one block.

    Raises:
        CvftError: The model has no ``forward_intermediates``/``feature_info``, an index is out of range or
            repeated, or a ViT was given several indices.

    Example:
        >>> import timm
        >>> feature_levels(timm.create_model("test_resnet", num_classes=0))
        FeatureLevels(indices=[2, 3, 4], channels=[48, 192, 96], strides=[8, 16, 32], is_vit=False)
        >>> feature_levels(timm.create_model("test_vit", num_classes=0)).strides
        [16]
    """
    info = getattr(backbone, "feature_info", None)
    if not callable(getattr(backbone, "forward_intermediates", None)) or not info:
        raise CvftError(
            f"{type(backbone).__name__} has no forward_intermediates()/feature_info, which detection reads its "
            "feature maps from; choose a timm CNN or ViT that supports features (timm.list_models() with "
            "features_only support: ResNet, ConvNeXt, EfficientNet, RegNet, ViT ...)."
        )
    levels = list(info)
    is_vit = len({int(level["reduction"]) for level in levels}) == 1 and len(levels) > 1
    count = len(levels)
    if out_indices is None:
        chosen = [count - 1] if is_vit else list(range(max(0, count - 3), count))
    else:
        chosen = [int(i) + count if int(i) < 0 else int(i) for i in out_indices]
        if not chosen or any(not 0 <= i < count for i in chosen) or chosen != sorted(set(chosen)):
            raise CvftError(
                f"out_indices={list(out_indices)} is not a list of distinct, increasing feature levels of "
                f"{type(backbone).__name__}, which has {count} (0..{count - 1}, or negative from the end)."
            )
        if is_vit and len(chosen) != 1:
            raise CvftError(
                f"out_indices={list(out_indices)}: a ViT backbone feeds the simple feature pyramid from one block; "
                "give a single index (default: the last block, [-1])."
            )
    return FeatureLevels(
        indices=chosen,
        channels=[int(levels[i]["num_chs"]) for i in chosen],
        strides=[int(levels[i]["reduction"]) for i in chosen],
        is_vit=is_vit,
    )


def _conv_ln(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False), LayerNorm2d(out_channels)
    )


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: several strides from one ViT feature map, without a top-down path.

    Scale 4: deconv 2x2 (stride 2), LayerNorm, GELU, deconv 2x2; scale 2: one deconv; scale 1: identity;
    scale 0.5: 2x2 max-pool. Each branch ends with a 1x1 conv + LayerNorm and a 3x3 conv + LayerNorm
    (Li et al., "Exploring Plain Vision Transformer Backbones for Object Detection", 2022).

    Args:
        in_channels: Channels of the ViT feature map (its embedding width).
        out_channels: Channels of every output level.
        scale_factors: Output scales relative to the input map, from the finest; each of 4, 2, 1, 0.5.
        extra_blocks: A torchvision ``ExtraFPNBlock`` appending coarser levels (``LastLevelP6P7``,
            ``LastLevelMaxPool``), or ``None``.

    Example:
        >>> import torch
        >>> pyramid = SimpleFeaturePyramid(64, 32)
        >>> out = pyramid(OrderedDict(last=torch.randn(1, 64, 6, 6)))
        >>> {name: tuple(t.shape[-2:]) for name, t in out.items()}
        {'0': (24, 24), '1': (12, 12), '2': (6, 6), '3': (3, 3)}
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        scale_factors: Sequence[float] = VITDET_SCALES,
        extra_blocks: ExtraFPNBlock | None = None,
    ) -> None:
        super().__init__()
        self.scale_factors = [float(s) for s in scale_factors]
        if not self.scale_factors or any(s not in VITDET_SCALES for s in self.scale_factors):
            raise CvftError(f"scale_factors must be taken from {list(VITDET_SCALES)}, got {list(scale_factors)}.")
        self.stages = nn.ModuleList()
        for scale in self.scale_factors:
            if scale == 4.0:
                half = in_channels // 2
                resample: list[nn.Module] = [
                    nn.ConvTranspose2d(in_channels, half, 2, stride=2),
                    LayerNorm2d(half),
                    nn.GELU(),
                    nn.ConvTranspose2d(half, in_channels // 4, 2, stride=2),
                ]
                width = in_channels // 4
            elif scale == 2.0:
                resample, width = [nn.ConvTranspose2d(in_channels, in_channels // 2, 2, stride=2)], in_channels // 2
            elif scale == 1.0:
                resample, width = [], in_channels
            else:
                resample, width = [nn.MaxPool2d(2, stride=2)], in_channels
            self.stages.append(
                nn.Sequential(*resample, _conv_ln(width, out_channels, 1), _conv_ln(out_channels, out_channels, 3))
            )
        self.extra_blocks = extra_blocks

    def forward(self, x: dict[str, Tensor]) -> OrderedDict[str, Tensor]:
        """Pyramid levels ``"0", "1", ...`` (finest first) from the last map of ``x``, plus the extra blocks'."""
        top = list(x.values())[-1]
        results = [stage(top) for stage in self.stages]
        names = [str(i) for i in range(len(results))]
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, [top], names)
        return OrderedDict(zip(names, results, strict=True))


def build_neck(
    levels: FeatureLevels, out_channels: int, extra_blocks: ExtraFPNBlock | None, scale_factors: Sequence[float]
) -> nn.Module:
    """A :class:`SimpleFeaturePyramid` for a ViT, else a torchvision ``FeaturePyramidNetwork``.

    Args:
        levels: The backbone levels (:func:`feature_levels`).
        out_channels: Channels of every output level.
        extra_blocks: Extra coarse levels appended after the pyramid.
        scale_factors: ViT only: the simple pyramid's scales.

    Example:
        >>> levels = FeatureLevels([2, 3, 4], [48, 192, 96], [8, 16, 32], False)
        >>> type(build_neck(levels, 32, None, VITDET_SCALES)).__name__
        'FeaturePyramidNetwork'
    """
    if levels.is_vit:
        return SimpleFeaturePyramid(levels.channels[-1], out_channels, scale_factors, extra_blocks)
    return FeaturePyramidNetwork(levels.channels, out_channels, extra_blocks=extra_blocks)


def neck_strides(levels: FeatureLevels, scale_factors: Sequence[float], extra: int) -> list[int]:
    """Strides of the neck's outputs: the pyramid levels, then ``extra`` levels each twice as coarse.

    Example:
        >>> neck_strides(FeatureLevels([5], [64], [16], True), VITDET_SCALES, 2)
        [4, 8, 16, 32, 64, 128]
    """
    strides = [round(levels.strides[-1] / s) for s in scale_factors] if levels.is_vit else list(levels.strides)
    return strides + [strides[-1] * 2 ** (i + 1) for i in range(extra)]


class MultiScaleFeatures(nn.Module):
    """A timm backbone plus a neck, as torchvision detectors expect: ``images -> OrderedDict`` of equal-width maps.

    With ``register=False`` the backbone and neck are only referenced, not registered as sub-modules, so that an
    owner (:class:`~cvft.tasks.ObjectDetector`) can keep them under its own names (``backbone.*``, ``neck.*``)
    while a torchvision detector still calls this module. :meth:`reuse_features` lets a second pass on the same
    images skip the backbone (the detector's validation loss after its predictions).

    Args:
        backbone: A timm model (``num_classes=0``).
        neck: The neck from :func:`build_neck`.
        levels: The levels the neck reads.
        out_channels: Channels of the neck's outputs.
        strides: Strides of the neck's outputs.
        register: Register ``backbone`` and ``neck`` as sub-modules.

    Example:
        >>> import timm, torch
        >>> body = timm.create_model("test_resnet", num_classes=0)
        >>> levels = feature_levels(body)
        >>> features = MultiScaleFeatures(body, build_neck(levels, 32, None, ()), levels, 32, [8, 16, 32])
        >>> [tuple(t.shape) for t in features(torch.randn(1, 3, 64, 64)).values()]
        [(1, 32, 8, 8), (1, 32, 4, 4), (1, 32, 2, 2)]
    """

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Module,
        levels: FeatureLevels,
        out_channels: int,
        strides: Sequence[int],
        register: bool = True,
    ) -> None:
        super().__init__()
        if register:
            self.body, self.neck = backbone, neck
        else:  # plain references: the owner registers them under its own names
            self.__dict__["body"], self.__dict__["neck"] = backbone, neck
        self.levels = levels
        self.out_channels = out_channels
        self.strides = list(strides)
        self._cache: tuple[Tensor, OrderedDict[str, Tensor]] | None = None
        self._caching = False

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        """Neck outputs for a normalised, padded image batch ``(B, C, H, W)``."""
        if self._cache is not None and self._cache[0].shape == images.shape and torch.equal(self._cache[0], images):
            return self._cache[1]
        maps = self.body.forward_intermediates(images, indices=self.levels.indices, intermediates_only=True)
        features = self.neck(OrderedDict((str(i), m) for i, m in enumerate(maps)))
        if self._caching:
            self._cache = (images, features)
        return features

    def reuse_features(self) -> _FeatureReuse:
        """Context in which a pass on the same image batch as the previous one reuses its features.

        Example:
            >>> import timm, torch
            >>> body = timm.create_model("test_resnet", num_classes=0)
            >>> levels = feature_levels(body)
            >>> features = MultiScaleFeatures(body, build_neck(levels, 32, None, ()), levels, 32, [8, 16, 32])
            >>> x = torch.randn(1, 3, 64, 64)
            >>> with torch.no_grad(), features.reuse_features():
            ...     features(x)["0"] is features(x)["0"]
            True
        """
        return _FeatureReuse(self)


class _FeatureReuse:
    def __init__(self, features: MultiScaleFeatures) -> None:
        self.features = features

    def __enter__(self) -> MultiScaleFeatures:
        self.features._caching, self.features._cache = True, None
        return self.features

    def __exit__(self, *exc: object) -> None:
        self.features._caching, self.features._cache = False, None
