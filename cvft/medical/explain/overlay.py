"""Heat maps drawn over images."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cvft.errors import CvftError

__all__ = ["overlay", "to_rgb_uint8"]


def to_rgb_uint8(image: np.ndarray | Tensor) -> np.ndarray:
    """An ``H x W``, ``H x W x C`` (or ``C x H x W`` tensor) image as ``H x W x 3`` ``uint8``.

    Floats are taken as ``[0, 1]``; one channel is repeated; 2.5D stacks (C not 1 or 3) show their middle channel.

    Example:
        >>> to_rgb_uint8(np.ones((2, 3), np.float32)).shape, int(to_rgb_uint8(np.ones((2, 3), np.float32)).max())
        ((2, 3, 3), 255)
    """
    if isinstance(image, Tensor):
        image = image.detach().cpu()
        image = (image.permute(1, 2, 0) if image.ndim == 3 else image).numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise CvftError(f"Expected an H x W or H x W x C image, got shape {array.shape}.")
    if array.shape[2] not in (1, 3):
        array = array[:, :, array.shape[2] // 2 : array.shape[2] // 2 + 1]
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    return array


def overlay(
    image: np.ndarray | Tensor, heatmap: np.ndarray | Tensor, alpha: float = 0.45, colormap: str = "jet"
) -> np.ndarray:
    """Blend a colour-mapped heat map over an image: ``(1 - alpha) * image + alpha * colour(heatmap)``.

    Args:
        image: ``H x W`` / ``H x W x C`` ``uint8`` or float ``[0, 1]`` array (or ``C x H x W`` tensor).
        heatmap: 2-D map with values in ``[0, 1]``, of any size: it is resized (bilinear) to the image.
        alpha: Weight of the heat map, in ``[0, 1]``.
        colormap: A matplotlib colormap name.

    Returns:
        ``H x W x 3`` ``uint8`` RGB array of the image's size.

    Example:
        >>> overlay(np.zeros((40, 30), np.uint8), np.eye(4)).shape
        (40, 30, 3)
    """
    if not 0.0 <= alpha <= 1.0:
        raise CvftError(f"alpha must be in [0, 1], got {alpha}.")
    import matplotlib

    base = to_rgb_uint8(image).astype(np.float32)
    heat = torch.as_tensor(np.asarray(heatmap, dtype=np.float32) if not isinstance(heatmap, Tensor) else heatmap)
    heat = heat.detach().float().cpu().squeeze()
    if heat.ndim != 2:
        raise CvftError(f"heatmap must be 2-D, got shape {tuple(heat.shape)}.")
    if tuple(heat.shape) != base.shape[:2]:
        heat = torch.nn.functional.interpolate(heat[None, None], size=base.shape[:2], mode="bilinear")[0, 0]
    colours = matplotlib.colormaps[colormap](heat.clamp(0, 1).numpy())[..., :3] * 255
    return np.clip(np.rint((1 - alpha) * base + alpha * colours), 0, 255).astype(np.uint8)
