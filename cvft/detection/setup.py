"""Checks and construction steps of :class:`~cvft.tasks.ObjectDetector`: classes, numbers, strategies, backbone."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from cvft.backbones import create_backbone
from cvft.errors import CvftError, StrategyError
from cvft.strategies.base import Strategy

__all__ = ["check_classes", "check_numbers", "refuse_strategies", "create_detection_backbone"]


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


def refuse_strategies(strategies: Iterable[Strategy]) -> None:
    """Refuse strategies a detector cannot run: data calibration, loss terms, several views, prompt tokens (vpt).

    Example:
        >>> from cvft.strategies import build_strategies
        >>> refuse_strategies(build_strategies(["lora"]))
        >>> refuse_strategies(build_strategies(["vpt"]))
        Traceback (most recent call last):
        ...
        cvft.errors.StrategyError: Strategy 'vpt' puts prompt tokens into the ViT's block outputs, which breaks forward_intermediates, the feature maps ObjectDetector reads; use lora or vit_adapter instead.
    """  # noqa: E501
    for strategy in strategies:
        if strategy.needs_data or strategy.objective or strategy.num_views > 1:
            raise StrategyError(
                f"Strategy {strategy.name!r} calibrates on data, adds loss terms or needs several views, which "
                "assume a classifier; ObjectDetector supports parameter strategies only (linear_probe, lora, "
                "loha, lokr, adapters, ssf, bitfit, freeze_layers, gradual_unfreeze, layerwise_lr ...)."
            )
        if strategy.name == "vpt":
            raise StrategyError(
                "Strategy 'vpt' puts prompt tokens into the ViT's block outputs, which breaks "
                "forward_intermediates, the feature maps ObjectDetector reads; use lora or vit_adapter instead."
            )


def create_detection_backbone(
    name: str, pretrained: bool, weights: str | None, in_chans: int, kwargs: dict[str, Any]
) -> nn.Module:
    """The timm backbone without classifier; ViTs get ``dynamic_img_size=True`` so that any input size works.

    Example:
        >>> create_detection_backbone("test_vit", False, None, 3, {}).dynamic_img_size
        True
    """
    common = {"pretrained": pretrained, "weights": weights, "num_classes": 0, "in_chans": in_chans}
    if "dynamic_img_size" not in kwargs:
        try:
            return create_backbone(name, **common, **kwargs, dynamic_img_size=True)
        except TypeError as exc:  # not a ViT: its constructor has no such argument
            if "dynamic_img_size" not in str(exc):
                raise
    return create_backbone(name, **common, **kwargs)
