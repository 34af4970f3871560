"""Test-time augmentation (TTA): classify several views of each test image and average their probabilities.

Modes (``ImageClassifier(tta=...)``, ``--model.tta``):

* ``none``: the image as it is;
* ``flip``: the image and its horizontal mirror (2 views);
* ``crops``: five crops on the already preprocessed batch, timm / torchvision ``FiveCrop`` style: the ``H x W`` batch
  is resized (bilinear) to ``round(H / crop_pct) x round(W / crop_pct)``, then the centre and the four corner
  ``H x W`` crops are taken (5 views, each covering ``crop_pct`` of the image's side);
* ``flip_crops``: those five crops and their mirrors (10 views, the classic ten-crop).

The views' **probabilities** are averaged (softmax, or sigmoid per label for multi-label), not their logits: the
mean of probabilities is the prediction of the ensemble of views (a mixture), it stays a probability whose NLL and
calibration can be measured, and one confident view cannot outvote the others by the size of its logits (averaging
logits is a geometric mean of probabilities, which is sharper). A temperature divides each view's logits before
the softmax. The result is returned as logits whose softmax (sigmoid) is the mean: ``log(mean p)`` for single-label,
``log(mean p) - log(1 - mean p)`` per label for multi-label, computed in log space so that no probability underflows.

Example:
    >>> images = torch.arange(16.0).reshape(1, 1, 4, 4)
    >>> [tuple(view.shape) for view in tta_views(images, "flip_crops", crop_pct=0.5)]  # 4 / 0.5 = 8 px, 4 px crops
    [(1, 1, 4, 4), (1, 1, 4, 4), (1, 1, 4, 4), (1, 1, 4, 4), (1, 1, 4, 4), (1, 1, 4, 4), (1, 1, 4, 4), (1, 1, 4, 4), (1, 1, 4, 4), (1, 1, 4, 4)]
    >>> tta_views(images, "flip")[1][0, 0, 0].tolist()
    [3.0, 2.0, 1.0, 0.0]
"""  # noqa: E501

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from cvft.errors import ConfigError

__all__ = ["TTA_MODES", "averaged_logits", "check_tta", "five_crops", "tta_logits", "tta_views"]

TTA_MODES: tuple[str, ...] = ("none", "flip", "crops", "flip_crops")
"""Values of ``ImageClassifier(tta=...)``."""


def check_tta(mode: str, crop_pct: float) -> None:
    """Refuse an unknown TTA mode or a ``crop_pct`` outside ``(0, 1]``.

    Raises:
        ConfigError: The message names the value, the allowed ones and the option.

    Example:
        >>> check_tta("rotate", 0.875)
        Traceback (most recent call last):
        ...
        cvft.errors.ConfigError: Unknown tta 'rotate'; choose one of none, flip, crops, flip_crops (on the command line: --model.tta).
    """  # noqa: E501
    if mode not in TTA_MODES:
        raise ConfigError(
            f"Unknown tta {mode!r}; choose one of {', '.join(TTA_MODES)} (on the command line: --model.tta)."
        )
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, int | float) or not 0.0 < crop_pct <= 1.0:
        raise ConfigError(
            f"tta_crop_pct={crop_pct!r} is out of range; it is the fraction of the image side each crop covers, in "
            "(0, 1] (0.875 as timm's crop_pct). Pass a value in that range (on the command line: --model.tta_crop_pct)."
        )


def five_crops(images: Tensor, crop_pct: float) -> list[Tensor]:
    """The centre and four corner crops of ``images`` resized by ``1 / crop_pct``, each of the input's size.

    Example:
        >>> images = torch.arange(4.0).reshape(1, 1, 2, 2)
        >>> [crop.flatten().tolist() for crop in five_crops(images, 1.0)] == [images.flatten().tolist()] * 5
        True
    """
    height, width = images.shape[-2:]
    big_height, big_width = round(height / crop_pct), round(width / crop_pct)
    if (big_height, big_width) == (height, width):
        large = images
    else:
        large = F.interpolate(images, size=(big_height, big_width), mode="bilinear", align_corners=False)
    top, left = (big_height - height) // 2, (big_width - width) // 2
    bottom, right = big_height - height, big_width - width
    corners = [(top, left), (0, 0), (0, right), (bottom, 0), (bottom, right)]
    return [large[..., y : y + height, x : x + width] for y, x in corners]


def tta_views(images: Tensor, mode: str, crop_pct: float = 0.875) -> list[Tensor]:
    """The views ``mode`` classifies: the image (``none``), plus its mirror (``flip``), five crops (``crops``), or
    the five crops and their mirrors (``flip_crops``); see the module docstring.
    """  # noqa: D205
    check_tta(mode, crop_pct)
    views = five_crops(images, crop_pct) if mode in ("crops", "flip_crops") else [images]
    if mode in ("flip", "flip_crops"):
        views = views + [view.flip(-1) for view in views]
    return views


def averaged_logits(view_logits: list[Tensor], multi_label: bool = False) -> Tensor:
    """Logits whose softmax (multi-label: sigmoid) is the mean of the views' softmax (sigmoid) probabilities.

    One view is returned unchanged.

    Example:
        >>> a, b = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
        >>> averaged_logits([a, b]).softmax(-1)
        tensor([[0.5000, 0.5000]])
        >>> averaged_logits([a, b], multi_label=True).sigmoid()  # (sigmoid(2) + sigmoid(0)) / 2 = (0.8808 + 0.5) / 2
        tensor([[0.6904, 0.6904]])
    """
    if len(view_logits) == 1:
        return view_logits[0]
    stacked = torch.stack(view_logits).float()
    log_count = math.log(len(view_logits))
    if multi_label:  # logit(mean p) = log(mean p) - log(mean (1 - p)), with log p = logsigmoid(z), log(1 - p) = ...(-z)
        log_positive = torch.logsumexp(F.logsigmoid(stacked), 0) - log_count
        log_negative = torch.logsumexp(F.logsigmoid(-stacked), 0) - log_count
        return log_positive - log_negative
    return torch.logsumexp(stacked.log_softmax(-1), 0) - log_count


def tta_logits(
    classify: Callable[[Tensor], Tensor],
    images: Tensor,
    mode: str,
    crop_pct: float = 0.875,
    multi_label: bool = False,
    temperature: float | Tensor = 1.0,
) -> Tensor:
    """Classify every view of ``images`` (one forward each) and average their probabilities (returned as logits).

    Args:
        classify: The model's forward: ``(B, C, H, W)`` images to ``(B, classes)`` logits.
        images: A batch of preprocessed images.
        mode: One of :data:`TTA_MODES`.
        crop_pct: Side fraction of each crop (``crops``, ``flip_crops``).
        multi_label: Sigmoid outputs (average per label) instead of a softmax.
        temperature: Divides each view's logits before the averaging (temperature scaling).

    Example:
        >>> symmetric = lambda x: (x + x.flip(-1)).mean((1, 2, 3))[:, None] * torch.tensor([[1.0, -1.0]])
        >>> images = torch.randn(3, 3, 8, 8)
        >>> torch.allclose(tta_logits(symmetric, images, "flip").softmax(-1), symmetric(images).softmax(-1))
        True
    """
    return averaged_logits([classify(view) / temperature for view in tta_views(images, mode, crop_pct)], multi_label)
