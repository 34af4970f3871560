"""Albumentations pipelines for training and evaluation, and the pretrained data config of a timm backbone.

Evaluation follows timm's convention: resize the shorter side to ``floor(image_size / crop_pct)``, then center-crop
``image_size``. Training presets:

* ``"none"``: the evaluation pipeline (no augmentation).
* ``"light"``: ``RandomResizedCrop(scale=(0.5, 1))`` + horizontal flip.
* ``"default"``: ``RandomResizedCrop(scale=(0.08, 1))`` + horizontal flip (timm's / torchvision's ImageNet recipe).
* ``"strong"``: ``"default"`` + small affine (rotate ±15°, shift ±6 %, scale 0.9-1.1) + colour jitter.
* ``"randaugment"`` (= timm's ``"rand-m9-n2-mstd0.5"``), ``"trivialaugment"``, ``"augmix"`` (= ``"augmix-m3-w3-a1"``):
  ``"default"`` + that policy (:mod:`cvft.data.auto_augment`); timm-style strings set its parameters, e.g.
  ``"rand-m7-n3"`` or ``"augmix-m5-w4"``.

``random_erasing=p`` adds timm's random erasing (:mod:`cvft.data.random_erasing`) to any training preset, after
``Normalize`` as in timm.

Flips and heavy crops do not suit every data set (digits, text, medical images): pick ``"light"`` or ``"none"``.
All pipelines end in ``Normalize(mean, std)`` and ``ToTensorV2``, turning an ``H x W x C`` ``uint8`` array into a
``C x H x W`` ``float32`` tensor.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import timm
import torch
from albumentations.pytorch import ToTensorV2
from timm.data import resolve_model_data_config
from torch import nn

from cvft.data.auto_augment import AUTO_AUGMENT_PRESETS, auto_augment_step, is_auto_augment
from cvft.data.random_erasing import ERASING_MODES, RandomErasing
from cvft.errors import ConfigError

__all__ = [
    "AUGMENT_PRESETS",
    "INTERPOLATIONS",
    "IMAGENET_DATA_CONFIG",
    "build_transforms",
    "check_augment",
    "data_config_for",
    "eval_resize_size",
]

AUGMENT_PRESETS: tuple[str, ...] = ("none", "light", "default", "strong", *AUTO_AUGMENT_PRESETS)
"""Names accepted by ``build_transforms(preset=...)`` (timm-style ``rand-...`` / ``augmix-...`` strings too)."""

INTERPOLATIONS: dict[str, int] = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}
"""Interpolation names (timm's spelling) and their OpenCV flags."""

IMAGENET_DATA_CONFIG: dict[str, Any] = {
    "input_size": (3, 224, 224),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bicubic",
    "crop_pct": 0.875,
}
"""Data config used when no backbone is known (ImageNet statistics, 224 px)."""

_CROP_RATIO = (3 / 4, 4 / 3)


def build_transforms(
    image_size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    preset: str = "default",
    interpolation: str = "bicubic",
    crop_pct: float = 0.875,
    seed: int | None = None,
    random_erasing: float = 0.0,
    random_erasing_mode: str = "pixel",
) -> A.Compose:
    """Build the albumentations pipeline for training or evaluation.

    Args:
        image_size: Output size, ``int`` for square or ``(height, width)``.
        mean: Per-channel mean in 0..1 (one value per image channel).
        std: Per-channel standard deviation in 0..1.
        train: Build the augmenting training pipeline (``False``: deterministic evaluation pipeline).
        preset: Training augmentation, one of :data:`AUGMENT_PRESETS` or a timm-style ``rand-...`` / ``augmix-...``
            string (:mod:`cvft.data.auto_augment`); ignored when ``train=False``.
        interpolation: One of :data:`INTERPOLATIONS`.
        crop_pct: Evaluation center-crop fraction (timm's ``crop_pct``), in ``(0, 1]``.
        seed: Seed of the pipeline's own random generator (albumentations ignores global seeds).
        random_erasing: Probability of timm's random erasing on training images (0: off); ignored when
            ``train=False``.
        random_erasing_mode: Fill of the erased box, one of :data:`~cvft.data.random_erasing.ERASING_MODES`.

    Returns:
        A ``Compose`` taking ``image=`` an ``H x W x C`` ``uint8`` array and returning ``{"image": tensor}``.

    Raises:
        ValueError: Unknown preset, interpolation or erasing mode, ``crop_pct`` outside ``(0, 1]``, or
            ``random_erasing`` outside ``[0, 1]`` (:class:`~cvft.errors.ConfigError`, a ``ValueError``, for the
            augmentation options).

    Example:
        >>> import numpy as np
        >>> pipeline = build_transforms(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), train=True, preset="light")
        >>> pipeline(image=np.zeros((40, 50, 3), np.uint8))["image"].shape
        torch.Size([3, 32, 32])
    """
    height, width = _size_pair(image_size)
    check_augment(preset, random_erasing, random_erasing_mode)
    flag = _interpolation_flag(interpolation, mean, std)
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}.")
    if train and preset != "none":
        steps = _train_steps(height, width, preset, flag)
        if is_auto_augment(preset):
            steps.append(auto_augment_step(preset, fill=mean))
    else:
        steps = _eval_steps(height, width, crop_pct, flag)
    return _normalised_pipeline(steps, mean, std, 255.0, random_erasing if train else 0.0, random_erasing_mode, seed)


def check_augment(preset: str, random_erasing: float = 0.0, random_erasing_mode: str = "pixel") -> None:
    """Check the training augmentation options of :func:`build_transforms` (DataModules call it on construction).

    Args:
        preset: A name of :data:`AUGMENT_PRESETS` or a timm-style ``rand-...`` / ``augmix-...`` string.
        random_erasing: Erasing probability, in ``[0, 1]``.
        random_erasing_mode: One of :data:`~cvft.data.random_erasing.ERASING_MODES`.

    Raises:
        ConfigError: The bad option, its value and the allowed values.

    Example:
        >>> check_augment("rand-m7-n3", 0.25)
        >>> try:
        ...     check_augment("randaugmnet")
        ... except ConfigError as error:
        ...     print(str(error).split(";")[0])
        Unknown augment preset 'randaugmnet'
    """
    if not isinstance(preset, str) or (preset not in AUGMENT_PRESETS and not is_auto_augment(preset)):
        raise ConfigError(
            f"Unknown augment preset {preset!r}; choose one of {', '.join(AUGMENT_PRESETS)}, or a timm-style "
            "string such as rand-m9-n2-mstd0.5 or augmix-m3-w3-a1."
        )
    if is_auto_augment(preset):
        auto_augment_step(preset)  # refuses unknown keys and values out of range
    if isinstance(random_erasing, bool) or not isinstance(random_erasing, (int, float)) or not 0 <= random_erasing <= 1:
        raise ConfigError(
            f"random_erasing is the probability of erasing a box (timm's reprob), in [0, 1]; got {random_erasing!r}. "
            "Try --data.random_erasing 0.25."
        )
    if random_erasing_mode not in ERASING_MODES:
        raise ConfigError(
            f"Unknown random_erasing_mode {random_erasing_mode!r}; choose one of {', '.join(ERASING_MODES)}."
        )


def eval_resize_size(image_size: int | Sequence[int], crop_pct: float) -> tuple[int, int]:
    """Return the ``(height, width)`` an image is resized to before the evaluation center crop.

    Args:
        image_size: Final size, ``int`` or ``(height, width)``.
        crop_pct: Center-crop fraction.

    Returns:
        ``floor(size / crop_pct)`` per side (timm's convention).

    Example:
        >>> eval_resize_size(224, 0.875)
        (256, 256)
    """
    height, width = _size_pair(image_size)
    return math.floor(height / crop_pct), math.floor(width / crop_pct)


def data_config_for(backbone: str | nn.Module) -> dict[str, Any]:
    """Return the input size, normalisation and eval resizing a timm backbone was pretrained with.

    The model is built on PyTorch's ``meta`` device with ``pretrained=False``: nothing is downloaded or allocated.

    Args:
        backbone: timm model name, optionally with a pretrained tag (``vit_small_patch16_224.augreg_in21k``), or a
            timm model instance.

    Returns:
        ``{"input_size": (C, H, W), "mean": (...), "std": (...), "interpolation": str, "crop_pct": float}``.

    Raises:
        cvft.backbones.factory.UnknownBackboneError: ``backbone`` is not a timm model name.

    Example:
        >>> config = data_config_for("tf_efficientnet_lite0")
        >>> config["input_size"], config["mean"]
        ((3, 224, 224), (0.5, 0.5, 0.5))
    """
    if isinstance(backbone, nn.Module):
        return _normalise(resolve_model_data_config(backbone))
    return dict(_config_for_name(backbone))


@functools.lru_cache(maxsize=64)
def _config_for_name(name: str) -> dict[str, Any]:
    from cvft.backbones.factory import UnknownBackboneError

    architecture = name.split(".", 1)[0]
    if ":" not in name and not timm.is_model(architecture):
        pattern = architecture.split("_", 1)[0]
        raise UnknownBackboneError(
            f"Unknown backbone {name!r}: not a timm model. List models with timm.list_models('*{pattern}*')."
        )
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception as error:
        if "pretrained tag" in str(error):
            raise UnknownBackboneError(
                f"Unknown pretrained tag in backbone {name!r}: {error} List tags with "
                f"timm.list_pretrained('{architecture}*')."
            ) from error
        model = timm.create_model(name, pretrained=False)  # some models cannot be built on the meta device
    return _normalise(resolve_model_data_config(model))


def _normalise(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "input_size": tuple(int(v) for v in config["input_size"]),
        "mean": tuple(float(v) for v in config["mean"]),
        "std": tuple(float(v) for v in config["std"]),
        "interpolation": str(config.get("interpolation") or "bicubic"),
        "crop_pct": float(config.get("crop_pct") or 0.875),
    }


def _size_pair(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` of an ``image_size`` given as ``int`` or pair (every pipeline builder's check of it)."""
    pair = (image_size, image_size) if isinstance(image_size, int) else tuple(int(v) for v in image_size)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}.")
    return pair[0], pair[1]


def _interpolation_flag(interpolation: str, mean: Sequence[float], std: Sequence[float]) -> int:
    """The OpenCV flag of ``interpolation``, after the checks every pipeline builder makes of it and of mean / std."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"Unknown interpolation {interpolation!r}; choose one of {', '.join(INTERPOLATIONS)}.")
    if len(mean) != len(std):
        raise ValueError(f"mean and std need one value per channel, got {len(mean)} and {len(std)} values.")
    return INTERPOLATIONS[interpolation]


def _normalised_pipeline(
    steps: list[Any],
    mean: Sequence[float],
    std: Sequence[float],
    max_pixel_value: float,
    random_erasing: float,
    random_erasing_mode: str,
    seed: int | None,
) -> A.Compose:
    """``steps``, then ``Normalize``, random erasing (where ``random_erasing > 0``) and ``ToTensorV2``, as one pipeline.

    The ending every pipeline builder shares; ``max_pixel_value`` is the input's full scale (255 for ``uint8``, 1 for
    float images in ``[0, 1]``), and erasing follows ``Normalize`` as in timm.
    """
    steps = [*steps, A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=max_pixel_value)]
    if random_erasing > 0:
        steps.append(RandomErasing(mode=random_erasing_mode, p=random_erasing))
    steps.append(ToTensorV2())
    return A.Compose(steps, seed=seed)


def _eval_steps(height: int, width: int, crop_pct: float, flag: int) -> list[Any]:
    resize_h, resize_w = eval_resize_size((height, width), crop_pct)
    if height == width:
        resize: Any = A.SmallestMaxSize(max_size=resize_h, interpolation=flag)
    else:
        resize = A.Resize(height=resize_h, width=resize_w, interpolation=flag)
    return [resize, A.CenterCrop(height=height, width=width)]


def _train_steps(height: int, width: int, preset: str, flag: int) -> list[Any]:
    """Crop and flip (every preset but ``none``), plus the affine and colour jitter of ``strong``."""
    scale = (0.5, 1.0) if preset == "light" else (0.08, 1.0)
    steps: list[Any] = [
        A.RandomResizedCrop(size=(height, width), scale=scale, ratio=_CROP_RATIO, interpolation=flag),
        A.HorizontalFlip(p=0.5),
    ]
    if preset == "strong":
        steps += [
            A.Affine(scale=(0.9, 1.1), translate_percent=(-0.06, 0.06), rotate=(-15, 15), interpolation=flag, p=0.5),
            A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8),
        ]
    return steps
