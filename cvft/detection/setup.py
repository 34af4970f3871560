"""Checks and construction steps of :class:`~cvft.tasks.ObjectDetector`: classes, numbers, head, backbone, network."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from cvft.backbones import create_backbone
from cvft.detection.fcos_regression import BoxActivation
from cvft.detection.features import FeatureLevels, MultiScaleFeatures, build_neck, neck_strides
from cvft.detection.heads import (
    build_detection_model,
    extra_block,
    extra_levels,
    image_normalisation,
    vit_scale_factors,
)
from cvft.errors import CvftError, StrategyError
from cvft.strategies.base import Strategy
from cvft.strategies.support import TaskSupport, check_supported

__all__ = [
    "NMS_DEFAULTS",
    "build_detector_network",
    "check_classes",
    "check_head",
    "check_numbers",
    "create_detection_backbone",
    "refuse_replaced_feature_maps",
    "refuse_strategies",
]

#: Default per-class NMS IoU threshold of each detection head.
NMS_DEFAULTS: dict[str, float] = {"fcos": 0.6, "retinanet": 0.5, "faster_rcnn": 0.5}


def check_classes(
    num_classes: int | None, class_names: Sequence[str] | None, category_ids: Sequence[int] | None
) -> tuple[list[str], list[int]]:
    """Class names and category ids, one per class (defaults ``"0", "1", ...`` and ``0..C-1``).

    Raises:
        CvftError: No class count, or lists that do not match it, or repeated category ids.

    Example:
        >>> check_classes(None, ["cat", "dog"], [3, 7])
        (['cat', 'dog'], [3, 7])
        >>> check_classes(2, None, None)
        (['0', '1'], [0, 1])
    """
    if num_classes is None and class_names is not None:
        num_classes = len(class_names)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise CvftError(
            f"ObjectDetector needs num_classes >= 1 (or class_names), got {num_classes!r}; on the command line "
            "the data module provides it."
        )
    names = [str(n) for n in class_names] if class_names is not None else [str(i) for i in range(num_classes)]
    ids = [int(i) for i in category_ids] if category_ids is not None else list(range(num_classes))
    if len(names) != num_classes or len(ids) != num_classes or len(set(ids)) != len(ids):
        raise CvftError(
            f"num_classes={num_classes} needs as many class_names ({len(names)} given) and distinct category_ids "
            f"({ids}); pass matching lists or leave them out."
        )
    return names, ids


def check_numbers(
    fpn_channels: int, image_size: int, score_thresh: float, nms_thresh: float | None, per_image: int, lr_scale: float
) -> None:
    """Refuse out-of-range numeric arguments of the detector, naming the argument.

    Example:
        >>> check_numbers(256, 512, 0.05, None, 100, 0.1)
        >>> check_numbers(256, 16, 0.05, None, 100, 0.1)
        Traceback (most recent call last):
        ...
        cvft.errors.CvftError: image_size must be >= 32 pixels, got 16.
    """
    checks = {
        f"fpn_channels must be >= 8, got {fpn_channels}": fpn_channels >= 8,
        f"image_size must be >= 32 pixels, got {image_size}": image_size >= 32,
        f"score_thresh must be in [0, 1), got {score_thresh}": 0.0 <= score_thresh < 1.0,
        f"nms_thresh must be in (0, 1], got {nms_thresh}": nms_thresh is None or 0.0 < nms_thresh <= 1.0,
        f"detections_per_img must be >= 1, got {per_image}": per_image >= 1,
        f"backbone_lr_scale must be >= 0, got {lr_scale}": lr_scale >= 0,
    }
    for message, ok in checks.items():
        if not ok:
            raise CvftError(message + ".")


def check_head(head: str) -> None:
    """Refuse a detection head cvft does not build.

    Raises:
        CvftError: ``head`` is not one of :data:`NMS_DEFAULTS`' keys (``fcos``, ``retinanet``, ``faster_rcnn``).

    Example:
        >>> check_head("fcos")
        >>> check_head("yolo")
        Traceback (most recent call last):
        ...
        cvft.errors.CvftError: Unknown detection head 'yolo'; choose one of ['fcos', 'retinanet', 'faster_rcnn'].
    """
    if head not in NMS_DEFAULTS:
        raise CvftError(f"Unknown detection head {head!r}; choose one of {list(NMS_DEFAULTS)}.")


DETECTOR_SUPPORT = TaskSupport("ObjectDetector", reads_feature_maps=True)
"""What a detector gives its strategies: images and boxes, no views or indices; it reads the backbone's feature maps."""


def refuse_strategies(strategies: Iterable[Strategy]) -> None:
    """Refuse strategies a detector cannot run (deprecated: use :func:`cvft.strategies.support.check_supported`).

    Raises:
        StrategyError: See :func:`~cvft.strategies.support.check_supported`.
    """
    warnings.warn(
        "cvft.detection.setup.refuse_strategies is deprecated; use "
        "cvft.strategies.support.check_supported(strategies, ObjectDetector.strategy_support).",
        DeprecationWarning,
        stacklevel=2,
    )
    check_supported(strategies, DETECTOR_SUPPORT)


def refuse_replaced_feature_maps(backbone: nn.Module, strategies: Iterable[Strategy]) -> None:
    """Refuse a backbone whose strategies replaced its ``forward_intermediates`` (run after their set-up).

    The strategies' :attr:`~cvft.strategies.Strategy.keeps_feature_maps` flags are checked before anything is
    built; this catches a strategy that replaces the method without declaring it.

    Raises:
        StrategyError: ``forward_intermediates`` is an instance attribute of ``backbone`` (a strategy patched it).
    """
    if "forward_intermediates" in vars(backbone):
        raise StrategyError(
            f"Strategies {[s.name for s in strategies]} replace the backbone's forward_intermediates (vpt adds prompt "
            "tokens to the block outputs), which ObjectDetector reads its feature maps from. Leave that strategy "
            "out; lora, adapters, ssf or bitfit fine-tune a detection backbone."
        )


def create_detection_backbone(name: str, **kwargs: Any) -> nn.Module:
    """:func:`~cvft.backbones.create_backbone` for a detector: ViTs get ``dynamic_img_size=True`` (any input size).

    Example:
        >>> create_detection_backbone("test_vit", pretrained=False, num_classes=0).dynamic_img_size
        True
    """
    if "dynamic_img_size" not in kwargs:
        try:
            return create_backbone(name, **kwargs, dynamic_img_size=True)
        except TypeError as exc:  # not a ViT: its constructor has no such argument
            if "dynamic_img_size" not in str(exc):
                raise
    return create_backbone(name, **kwargs)


def build_detector_network(
    backbone: nn.Module,
    levels: FeatureLevels,
    head: str,
    num_classes: int,
    in_chans: int,
    fpn_channels: int,
    image_size: int,
    anchor_sizes: Sequence[int] | None,
    aspect_ratios: Sequence[float] | None,
    score_thresh: float,
    nms_thresh: float | None,
    detections_per_img: int,
    box_activation: BoxActivation = "exp",
) -> tuple[nn.Module, nn.Module]:
    """The neck (FPN for CNNs, ViTDet simple pyramid for ViTs) and the torchvision detector reading ``backbone``.

    Args:
        backbone: The timm backbone (strategies already set up).
        levels: Its feature levels read (:func:`~cvft.detection.features.feature_levels`).
        head: ``"fcos"``, ``"retinanet"`` or ``"faster_rcnn"``.
        num_classes: Object classes, without background.
        in_chans: Input channels (for the normalisation constants).
        fpn_channels: Channels of the neck's outputs and the heads.
        image_size: Side images are resized to.
        anchor_sizes: One base anchor size per output level (``None``: scaled to ``image_size``).
        aspect_ratios: Anchor height/width ratios (``None``: ``[0.5, 1, 2]``).
        score_thresh: Minimum score of returned detections.
        nms_thresh: Per-class NMS IoU threshold (``None``: :data:`NMS_DEFAULTS` of ``head``).
        detections_per_img: Most detections per image.
        box_activation: FCOS's box distances, ``"exp"`` (the paper) or ``"relu"`` (torchvision).

    Returns:
        ``(neck, detector)``; the detector's ``backbone`` is a :class:`~cvft.detection.features.MultiScaleFeatures`
        over ``backbone`` and ``neck`` (which it does not register again).
    """
    scales = vit_scale_factors(head)
    neck = build_neck(levels, fpn_channels, extra_block(head, fpn_channels), scales)
    strides = neck_strides(levels, scales, extra_levels(head))
    features = MultiScaleFeatures(backbone, neck, levels, fpn_channels, strides, register=False)
    mean, std = image_normalisation(backbone, in_chans)
    detector = build_detection_model(
        head, features, num_classes, image_size, mean, std, anchor_sizes, aspect_ratios,
        score_thresh, nms_thresh if nms_thresh is not None else NMS_DEFAULTS[head], detections_per_img,
        box_activation,
    )  # fmt: skip
    return neck, detector
