"""Augmentation presets for medical images: float ``[0, 1]`` input, no flips unless asked, whole image kept.

Natural-image recipes (random resized crops, horizontal flips, colour jitter) break medical images: a crop can
cut the finding out, and a flip turns a left lung into a right one (a heart on the wrong side is a rare
condition, *situs inversus*, not an augmentation). The presets here:

* ``"none"``: evaluation pipeline only (no augmentation).
* ``"medical"``: small affine (rotate ±10°, scale 0.9-1.1, shift ±5 %) with zero fill, and brightness /
  contrast ±10 %. Never flips.
* ``"medical_flip"``: ``"medical"`` plus horizontal flips, for data where laterality does not matter (skin
  lesions, histology patches, retina images of either eye with the side recorded elsewhere).
* ``"randaugment"``, ``"trivialaugment"``, ``"augmix"`` and timm-style ``"rand-m9-n2-mstd0.5"`` /
  ``"augmix-m3-w3-a1"`` strings (:mod:`cvft.data.auto_augment`): that policy, run on the float image in place of
  ``"medical"``'s affine and brightness / contrast (its own shear, translate and rotate operations are the geometric
  part; uncovered pixels are filled with 0 like the padding). Never flips. Its photometric operations (solarize,
  posterize, equalize, autocontrast) remap intensities: for calibrated data (CT in Hounsfield units, quantitative
  maps) prefer ``"medical"``; for photographs, dermoscopy, histology and MedMNIST-like 8-bit images they are
  the augmentations of the natural-image recipes.

``random_erasing=p`` adds timm's random erasing (:mod:`cvft.data.random_erasing`) after normalisation to a training
pipeline.

Every pipeline fits the whole image into ``image_size`` keeping its aspect ratio (longest side resized, the rest
padded with zeros), so nothing near the border is cropped away, and ends in ``Normalize(mean, std)`` (for values
in ``[0, 1]``) and ``ToTensorV2``: an ``H x W x C`` ``float32`` array in, a ``C x H x W`` tensor out.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2

from cvft.data.auto_augment import AUTO_AUGMENT_PRESETS, auto_augment_step, is_auto_augment
from cvft.data.transforms import _interpolation_flag, _normalised_pipeline, _size_pair, check_augment
from cvft.errors import ConfigError

__all__ = ["MEDICAL_AUGMENT_PRESETS", "build_medical_transforms", "check_medical_augment"]

MEDICAL_AUGMENT_PRESETS: tuple[str, ...] = ("none", "medical", "medical_flip", *AUTO_AUGMENT_PRESETS)
"""Names accepted by ``build_medical_transforms(preset=...)`` and ``MedicalImageDataModule(augment=...)`` (timm-style
``rand-...`` / ``augmix-...`` strings too)."""


def build_medical_transforms(
    image_size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    preset: str = "medical",
    interpolation: str = "bilinear",
    seed: int | None = None,
    random_erasing: float = 0.0,
    random_erasing_mode: str = "pixel",
) -> A.Compose:
    """Build the albumentations pipeline for float medical images.

    Args:
        image_size: Output size, ``int`` for square or ``(height, width)``, that the whole image is fitted into
            (longest side resized, the rest zero-padded; nothing is cropped).
        mean: Per-channel mean of values in ``[0, 1]`` (one value per image channel).
        std: Per-channel standard deviation.
        train: Build the augmenting training pipeline (``False``: the deterministic evaluation pipeline).
        preset: One of :data:`MEDICAL_AUGMENT_PRESETS` or a timm-style ``rand-...`` / ``augmix-...`` string;
            ignored when ``train=False``.
        interpolation: One of :data:`cvft.data.transforms.INTERPOLATIONS`.
        seed: Seed of the pipeline's own random generator (albumentations ignores global seeds).
        random_erasing: Probability of random erasing on training images (0: off); ignored when ``train=False``.
        random_erasing_mode: Fill of the erased box (``pixel``, ``rand`` or ``const``).

    Returns:
        A ``Compose`` taking ``image=`` an ``H x W x C`` ``float32`` array in ``[0, 1]`` and returning
        ``{"image": tensor}``.

    Raises:
        ValueError: Unknown preset or interpolation, bad ``image_size``, ``mean`` / ``std`` of different lengths, or
            bad random erasing options (:class:`~cvft.errors.ConfigError`, a ``ValueError``, for the augmentation
            options).

    Example:
        >>> import numpy as np
        >>> pipeline = build_medical_transforms(32, (0.5,), (0.25,), train=True, preset="medical", seed=0)
        >>> pipeline(image=np.zeros((40, 50, 1), np.float32))["image"].shape
        torch.Size([1, 32, 32])
    """
    check_medical_augment(preset, random_erasing, random_erasing_mode)
    flag = _interpolation_flag(interpolation, mean, std)
    height, width = _size_pair(image_size)
    steps: list[A.BasicTransform] = [
        A.LongestMaxSize(max_size_hw=(height, width), interpolation=flag),
        A.PadIfNeeded(min_height=height, min_width=width, border_mode=cv2.BORDER_CONSTANT, fill=0),
    ]
    if train and is_auto_augment(preset):
        steps.append(auto_augment_step(preset, fill=(0.0,)))
    elif train and preset != "none":
        steps += [
            A.Affine(
                scale=(0.9, 1.1),
                translate_percent=(-0.05, 0.05),
                rotate=(-10, 10),
                interpolation=flag,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                p=0.7,
            ),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
        ]
        if preset == "medical_flip":
            steps.append(A.HorizontalFlip(p=0.5))
    return _normalised_pipeline(steps, mean, std, 1.0, random_erasing if train else 0.0, random_erasing_mode, seed)


def check_medical_augment(preset: str, random_erasing: float = 0.0, random_erasing_mode: str = "pixel") -> None:
    """Check the training augmentation options of :func:`build_medical_transforms` (the DataModule calls it first).

    :func:`~cvft.data.transforms.check_augment` with the medical presets: ``preset`` is a name of
    :data:`MEDICAL_AUGMENT_PRESETS` (or a timm-style ``rand-...`` / ``augmix-...`` string); ``random_erasing`` and
    ``random_erasing_mode`` are checked (and documented) by ``check_augment``.

    Raises:
        ConfigError: The bad option, its value and the allowed values (the natural-image presets are named as
            refused: they crop and flip).

    Example:
        >>> check_medical_augment("rand-m7-n2", 0.25)
    """
    if isinstance(preset, str) and is_auto_augment(preset):
        check_augment(preset, random_erasing, random_erasing_mode)
        return
    if preset not in MEDICAL_AUGMENT_PRESETS:
        raise ConfigError(
            f"Unknown medical augmentation preset {preset!r}; choose one of {', '.join(MEDICAL_AUGMENT_PRESETS)}, or "
            "a timm-style string such as rand-m9-n2-mstd0.5 ('medical_flip' only where left and right do not "
            "matter; the natural-image presets light, default and strong crop and flip, which medical images do "
            "not tolerate)."
        )
    check_augment("none", random_erasing, random_erasing_mode)
