"""What a training step hands to the strategies: logits, pre-logit features, targets, views, indices.

Objectives such as distillation, supervised contrastive learning or continual-learning regularisers need more than
the logits: the pooled features before the classifier, the images (to run a teacher), the dataset index of each
sample (to cache teacher logits) and, with several augmented views per image, which rows belong together.

Rows are *view-major*: with ``num_views = V`` and a batch of ``B`` images, row ``v * B + i`` is view ``v`` of
image ``i``, so ``logits.view(V, B, -1)`` groups the views.

An objective that takes its own optimisation steps (``ppo``, ``trpo``) receives the batch before any forward pass,
as a :class:`StepBatch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

__all__ = ["StepBatch", "StepOutputs", "split_views", "forward_with_features"]


@dataclass(frozen=True)
class StepBatch:
    """One training batch as an objective that takes its own steps receives it (``Strategy.optimisation_step``).

    Attributes:
        images: ``(B, C, H, W)`` images, one view each.
        targets: ``(B,)`` class indices, ``(B, C)`` multi-hot targets or preference pairs, or None.
        indices: ``(B,)`` dataset indices of the images, when the data module provides them.

    Example:
        >>> import torch
        >>> batch = StepBatch(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]))
        >>> len(batch), batch.indices is None
        (2, True)
    """

    images: Tensor
    targets: Tensor | None = None
    indices: Tensor | None = None

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class StepOutputs:
    """One training step's outputs, as strategies see them.

    Attributes:
        logits: ``(V * B, num_classes)`` logits of every view, view-major.
        images: ``(V * B, C, H, W)`` the images the logits came from.
        targets: Targets repeated for every view (``(V * B,)`` class indices or ``(V * B, C)`` multi-hot; on a
            Mixup/CutMix step the ``(B, C)`` soft targets of the mixed images), or None.
        features: ``(V * B, D)`` pooled pre-logit features (the classifier's input), when a strategy asked for them.
        num_views: ``V``, the augmented views of each image.
        indices: ``(B,)`` dataset indices of the batch's images, when the data module provides them.

    Example:
        >>> import torch
        >>> out = StepOutputs(logits=torch.zeros(6, 3), images=torch.zeros(6, 3, 8, 8), num_views=2)
        >>> out.batch_size, out.per_view(out.logits).shape
        (3, torch.Size([2, 3, 3]))
    """

    logits: Tensor
    images: Tensor
    targets: Tensor | None = None
    features: Tensor | None = None
    num_views: int = 1
    indices: Tensor | None = None

    @property
    def batch_size(self) -> int:
        """Images per view, ``B``."""
        return self.logits.shape[0] // self.num_views

    def per_view(self, rows: Tensor) -> Tensor:
        """``rows`` of shape ``(V * B, ...)`` reshaped to ``(V, B, ...)``."""
        return rows.reshape(self.num_views, self.batch_size, *rows.shape[1:])

    @classmethod
    def from_batch(cls, batch: Sequence[Any], logits: Tensor) -> StepOutputs:
        """Outputs of a single-view step from someone else's module: ``batch = (images, targets, ...)``."""
        images, targets = batch[0], batch[1] if len(batch) > 1 else None
        indices = batch[2] if len(batch) > 2 and isinstance(batch[2], Tensor) and batch[2].ndim == 1 else None
        return cls(logits=logits, images=images, targets=targets, indices=indices)


def split_views(images: Tensor, targets: Tensor | None) -> tuple[Tensor, Tensor | None, int]:
    """Flatten a multi-view batch ``(B, V, C, H, W)`` to view-major ``(V * B, C, H, W)``; targets repeat per view.

    A plain ``(B, C, H, W)`` batch passes through with ``V = 1``.

    Example:
        >>> import torch
        >>> images, targets, views = split_views(torch.zeros(4, 2, 3, 8, 8), torch.arange(4))
        >>> images.shape, targets.tolist(), views
        (torch.Size([8, 3, 8, 8]), [0, 1, 2, 3, 0, 1, 2, 3], 2)
    """
    if images.ndim != 5:
        return images, targets, 1
    views = images.shape[1]
    flat = images.transpose(0, 1).flatten(0, 1)
    if targets is not None:
        targets = targets.repeat(views, *([1] * (targets.ndim - 1)))
    return flat, targets, views


def forward_with_features(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """Logits and pooled pre-logit features of a timm model in one pass: ``forward_features`` then ``forward_head``.

    The classifier runs on the pre-logits when ``get_classifier()`` is a module (ResNet, ViT, ConvNeXt,
    EfficientNet ...); otherwise (distilled DeiT's two heads) ``forward_head`` computes the logits.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_resnet", num_classes=3).eval()
        >>> x = torch.randn(2, 3, 32, 32)
        >>> logits, features = forward_with_features(model, x)
        >>> torch.allclose(logits, model(x)), features.shape[1] == model.num_features
        (True, True)
    """
    features = model.forward_features(images)
    pre_logits = model.forward_head(features, pre_logits=True)
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    logits = head(pre_logits) if isinstance(head, nn.Module) else model.forward_head(features)
    return logits, pre_logits
