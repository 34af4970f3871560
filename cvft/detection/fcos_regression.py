"""FCOS's box-regression head with the paper's ``exp(s_l * x)`` distances, or torchvision's ReLU.

FCOS (Tian et al. 2019) predicts the four distances from a location to its box's sides as ``exp(s_l * x)``, with one
trainable scale ``s_l`` per pyramid level. torchvision's ``FCOSRegressionHead`` uses ``relu(x)`` instead (the
"normalised regression targets" variant of the authors' later code), which trains well with SGD at the COCO
schedule. Fine-tuned with AdamW on a small data set, a ReLU output can die: on COCO128 ``person`` the right and
bottom distances of every location went to zero after a few dozen steps on two of three seeds, every predicted box
ended at its own anchor point, and mAP stayed at zero whatever the backbone strategy. ``exp`` is positive with a
non-zero gradient everywhere, so no distance can die; it is the default of :class:`~cvft.tasks.ObjectDetector`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.models.detection.fcos import FCOSRegressionHead

from cvft.errors import CvftError

__all__ = ["BOX_ACTIVATIONS", "BoxActivation", "FCOSBoxRegressionHead", "check_box_activation"]

BoxActivation = Literal["exp", "relu"]
BOX_ACTIVATIONS: tuple[str, ...] = ("exp", "relu")
#: Largest log-distance ``exp`` takes (``e**9`` anchor sizes): keeps an early, wild step from overflowing to inf.
_MAX_LOG_DISTANCE = 9.0


def check_box_activation(activation: str) -> str:
    """Return ``activation`` if it is one of :data:`BOX_ACTIVATIONS`; raise ``CvftError`` naming them otherwise."""
    if activation not in BOX_ACTIVATIONS:
        raise CvftError(f"Unknown box_activation {activation!r}; choose one of {list(BOX_ACTIVATIONS)}.")
    return activation


class FCOSBoxRegressionHead(FCOSRegressionHead):
    """torchvision's FCOS regression head whose distances are ``exp(s_l * x)`` (``"exp"``) or ``relu(x)``.

    With ``"relu"`` it computes exactly what ``FCOSRegressionHead`` computes. With ``"exp"`` it adds one trainable
    scale per level (``scales``, starting at 1) as in the FCOS paper. Distances are in units of the level's anchor
    size (torchvision's ``BoxLinearCoder(normalize_by_size=True)``), so at initialisation (``x`` near 0) every
    location predicts a box about two anchor sizes wide.

    Args:
        in_channels: Channels of the pyramid levels.
        num_anchors: Anchors per location (1 for FCOS).
        num_levels: Pyramid levels the head reads (one scale each with ``"exp"``).
        activation: ``"exp"`` (the paper) or ``"relu"`` (torchvision).
        num_convs: Convolutions of the shared tower.
        norm_layer: Normalisation of the tower (torchvision's default is ``GroupNorm(32)``).

    Example:
        >>> head = FCOSBoxRegressionHead(8, 1, num_levels=2, norm_layer=lambda c: nn.GroupNorm(2, c))
        >>> distances, centerness = head([torch.randn(1, 8, 4, 4), torch.randn(1, 8, 2, 2)])
        >>> distances.shape, bool((distances > 0).all()), centerness.shape
        (torch.Size([1, 20, 4]), True, torch.Size([1, 20, 1]))
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_levels: int,
        activation: BoxActivation = "exp",
        num_convs: int = 4,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__(in_channels, num_anchors, num_convs=num_convs, norm_layer=norm_layer)
        check_box_activation(activation)
        self.scales = nn.Parameter(torch.ones(num_levels)) if activation == "exp" else None

    @property
    def activation(self) -> BoxActivation:
        """``"exp"`` (with per-level ``scales``) or ``"relu"`` (without)."""
        return "relu" if self.scales is None else "exp"

    def distances(self, logits: Tensor, level: int) -> Tensor:
        """The positive side distances of one level from the raw outputs ``logits`` of ``bbox_reg``."""
        if self.scales is None:
            return nn.functional.relu(logits)
        return torch.exp((self.scales[level] * logits).clamp(max=_MAX_LOG_DISTANCE))

    def forward(self, x: list[Tensor]) -> tuple[Tensor, Tensor]:
        """``(distances (N, HWA, 4), centerness logits (N, HWA, 1))`` over all levels, as torchvision's head."""
        if self.scales is not None and len(x) != len(self.scales):
            raise CvftError(f"This FCOS head has {len(self.scales)} level scales but was given {len(x)} levels.")
        all_distances, all_centerness = [], []
        for level, features in enumerate(x):
            tower = self.conv(features)
            all_distances.append(_flatten_locations(self.distances(self.bbox_reg(tower), level), 4))
            all_centerness.append(_flatten_locations(self.bbox_ctrness(tower), 1))
        return torch.cat(all_distances, dim=1), torch.cat(all_centerness, dim=1)


def _flatten_locations(maps: Tensor, width: int) -> Tensor:
    """``(N, A * width, H, W)`` to ``(N, H * W * A, width)``, the order torchvision's FCOS decodes."""
    n, _, h, w = maps.shape
    return maps.view(n, -1, width, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, width)
