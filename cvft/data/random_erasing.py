"""timm's random erasing (Zhong et al. 2020) as an albumentations step on the normalised image.

timm erases after normalisation, and so does cvft: the step sits between ``Normalize`` and ``ToTensorV2``. There a
fill of ``0`` is the data set's mean colour (not black), and timm's default ``pixel`` mode fills with per-pixel
``N(0, 1)`` noise, which has the normalised data's own scale; before normalisation the same noise would be a
near-black speckle. The region follows timm's :class:`timm.data.RandomErasing` exactly: with probability ``p``, up to
10 attempts draw an area uniform in ``scale`` of the image and a log-uniform aspect ratio in
``[min_aspect, 1 / min_aspect]``; the first box that fits inside the image is erased.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from albumentations.core.transforms_interface import ImageOnlyTransform

__all__ = ["ERASING_MODES", "RandomErasing"]

ERASING_MODES: tuple[str, ...] = ("pixel", "rand", "const")
"""Fills of an erased box: per-pixel ``N(0, 1)`` noise, one ``N(0, 1)`` colour per box, or zeros (timm's modes)."""

_ATTEMPTS = 10


class RandomErasing(ImageOnlyTransform):
    """Erase one random box of a normalised ``float`` image (timm's ``RandomErasing``, one box per image).

    Args:
        mode: ``"pixel"`` (per-pixel normal noise, timm's ``--remode pixel``), ``"rand"`` (one normal colour per box)
            or ``"const"`` (zeros: the mean colour after normalisation).
        scale: Range of the erased area as a fraction of the image (timm: ``0.02`` to ``1/3``).
        min_aspect: Smallest aspect ratio of the box; the largest is its inverse.
        p: Probability of erasing (timm's ``reprob``).

    Example:
        >>> step = RandomErasing(mode="const", p=1.0)
        >>> step.set_random_seed(0)
        >>> erased = step(image=np.ones((20, 20, 3), np.float32))["image"]
        >>> 0.02 * 400 <= int((erased == 0).all(axis=2).sum()) <= 400 / 3 + 20
        True
    """

    def __init__(
        self,
        mode: str = "pixel",
        scale: tuple[float, float] = (0.02, 1 / 3),
        min_aspect: float = 0.3,
        p: float = 0.5,
    ) -> None:
        super().__init__(p=p)
        if mode not in ERASING_MODES:
            raise ValueError(f"Unknown random erasing mode {mode!r}; choose one of {', '.join(ERASING_MODES)}.")
        low, high = (float(v) for v in scale)
        if not 0.0 < low <= high < 1.0:
            raise ValueError(f"RandomErasing scale must satisfy 0 < low <= high < 1, got {scale!r}.")
        if not 0.0 < min_aspect <= 1.0:
            raise ValueError(f"RandomErasing min_aspect must be in (0, 1], got {min_aspect!r}.")
        self.mode, self.scale, self.min_aspect = mode, (low, high), float(min_aspect)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        """Draw the box ``(top, left, height, width)`` and its fill, or no box when no attempt fits."""
        shape = params["shape"]
        height, width = int(shape[0]), int(shape[1])
        channels = int(shape[2]) if len(shape) > 2 else 1
        log_aspect = (math.log(self.min_aspect), math.log(1.0 / self.min_aspect))
        for _ in range(_ATTEMPTS):
            area = self.py_random.uniform(*self.scale) * (height * width)
            aspect = math.exp(self.py_random.uniform(*log_aspect))
            box_h, box_w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if box_w < width and box_h < height:
                top, left = self.py_random.randint(0, height - box_h), self.py_random.randint(0, width - box_w)
                return {"box": (top, left, box_h, box_w), "fill": self._fill((box_h, box_w, channels))}
        return {"box": None, "fill": None}

    def _fill(self, shape: tuple[int, int, int]) -> np.ndarray:
        if self.mode == "pixel":
            return self.random_generator.standard_normal(shape, dtype=np.float32)
        if self.mode == "rand":
            return self.random_generator.standard_normal((1, 1, shape[2]), dtype=np.float32)
        return np.zeros((1, 1, shape[2]), np.float32)

    def apply(self, img: np.ndarray, box: Any = None, fill: Any = None, **params: Any) -> np.ndarray:
        """Return ``img`` with the box filled (``img`` must be normalised ``float``: after ``Normalize``)."""
        if not np.issubdtype(img.dtype, np.floating):
            raise ValueError(
                f"RandomErasing erases normalised float images (timm's order), got {img.dtype}; place it after "
                "Normalize and before ToTensorV2."
            )
        if box is None:
            return img
        top, left, box_h, box_w = box
        erased = img.copy()
        region = erased[top : top + box_h, left : left + box_w]
        region[...] = np.broadcast_to(fill, region.shape) if region.ndim == 3 else np.asarray(fill)[..., 0]
        return erased

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """Arguments written by ``A.save`` / ``A.to_dict``."""
        return ("mode", "scale", "min_aspect")
