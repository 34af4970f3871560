"""Box-aware augmentation for object detection (albumentations), ending in a letterbox to a square size.

Boxes follow every geometric step (``A.BboxParams(format="pascal_voc")``: ``x0, y0, x1, y1`` pixels), and a box
whose visible part falls below ``min_visibility`` of its area after a crop is dropped with its label.

* eval: **letterbox**: the longer side is resized to ``image_size`` (up or down), the rest padded with black on the
  bottom / right, so box coordinates of the output are those of the input times one scale factor, without offset.
* train, ``augment="default"``: fit to ``image_size``, random scale 0.6-1.4, a random ``image_size`` square crop
  (padded bottom / right when the scaled image is smaller), horizontal flip, mild colour jitter; then the letterbox.
* ``"strong"``: scale 0.3-2.0, stronger colour jitter, occasional grayscale.
* ``"none"``: the eval letterbox only.

Pipelines take ``image=`` (``H x W x 3`` ``uint8``), ``bboxes=`` (``(N, 4)``) and ``labels=`` and return numpy
arrays; :class:`~cvft.data.detection.dataset.DetectionDataset` turns them into tensors.
"""

from __future__ import annotations

import albumentations as A
import cv2

__all__ = ["DETECTION_AUGMENT_PRESETS", "build_detection_transforms"]

DETECTION_AUGMENT_PRESETS: tuple[str, ...] = ("none", "default", "strong")
"""Values of ``build_detection_transforms(augment=...)``."""

_SCALE = {"default": (0.6, 1.4), "strong": (0.3, 2.0)}
_COLOUR = {"default": 0.2, "strong": 0.4}


def build_detection_transforms(
    image_size: int,
    train: bool,
    augment: str = "default",
    min_visibility: float = 0.3,
    hflip: bool = True,
    keep_ratio: bool = True,
    seed: int | None = None,
) -> A.Compose:
    """Build the training or evaluation pipeline of images with boxes.

    Args:
        image_size: Side of the square output in pixels.
        train: Training pipeline (random augmentation) or evaluation pipeline (deterministic letterbox).
        augment: Training preset: ``"none"``, ``"default"`` or ``"strong"`` (ignored when ``train=False``).
        min_visibility: A box keeps at least this share of its area after cropping, or it is dropped.
        hflip: Flip horizontally with probability 0.5 in training (turn off where left / right matters).
        keep_ratio: Letterbox (keep the aspect ratio, pad bottom / right). ``False``: stretch to the square.
        seed: Seed of the pipeline's own random generator (albumentations ignores global seeds).

    Returns:
        A ``Compose`` called as ``pipeline(image=..., bboxes=..., labels=...)``.

    Raises:
        ValueError: Unknown ``augment``, ``image_size < 1`` or ``min_visibility`` outside 0..1.

    Example:
        >>> import numpy as np
        >>> pipeline = build_detection_transforms(64, train=False)
        >>> boxes, labels = np.array([[10, 10, 30, 20]], np.float32), np.array([2])
        >>> out = pipeline(image=np.zeros((50, 100, 3), np.uint8), bboxes=boxes, labels=labels)
        >>> out["image"].shape, out["bboxes"].round(1).tolist(), out["labels"].tolist()
        ((64, 64, 3), [[6.4, 6.4, 19.2, 12.8]], [2])
    """
    if augment not in DETECTION_AUGMENT_PRESETS:
        raise ValueError(f"Unknown augment {augment!r}; choose one of {', '.join(DETECTION_AUGMENT_PRESETS)}.")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}.")
    if not 0.0 <= min_visibility <= 1.0:
        raise ValueError(f"min_visibility must be within 0..1, got {min_visibility}.")
    steps: list[A.BasicTransform] = []
    if train and augment != "none":
        low, high = _SCALE[augment]
        colour = _COLOUR[augment]
        steps += [
            A.LongestMaxSize(max_size=image_size),
            A.RandomScale(scale_limit=(low - 1.0, high - 1.0), p=1.0),
            A.RandomCrop(
                height=image_size,
                width=image_size,
                pad_if_needed=True,
                pad_position="top_left",
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
            ),
        ]
        if hflip:
            steps.append(A.HorizontalFlip(p=0.5))
        steps.append(A.ColorJitter(brightness=colour, contrast=colour, saturation=colour, hue=colour / 8, p=0.8))
        if augment == "strong":
            steps.append(A.ToGray(p=0.05))
    steps += letterbox(image_size, keep_ratio)
    bbox_params = A.BboxParams(format="pascal_voc", label_fields=["labels"], min_visibility=min_visibility, clip=True)
    return A.Compose(steps, bbox_params=bbox_params, seed=seed)


def letterbox(image_size: int, keep_ratio: bool = True) -> list[A.BasicTransform]:
    """Return the steps that bring any image to ``image_size`` squared without moving box origins.

    Args:
        image_size: Side of the square output in pixels.
        keep_ratio: Resize the longer side and pad bottom / right with black; ``False``: stretch.

    Returns:
        Albumentations transforms to put in a ``Compose``.

    Example:
        >>> [type(step).__name__ for step in letterbox(64)]
        ['LongestMaxSize', 'PadIfNeeded']
    """
    if not keep_ratio:
        return [A.Resize(height=image_size, width=image_size)]
    return [
        A.LongestMaxSize(max_size=image_size),
        A.PadIfNeeded(
            min_height=image_size,
            min_width=image_size,
            position="top_left",
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
        ),
    ]
