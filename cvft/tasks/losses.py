r"""Classification losses beyond cross-entropy: the focal loss for imbalanced data.

Focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection", https://arxiv.org/abs/1708.02002) scales the
cross-entropy of each prediction by :math:`(1 - p_t)^\gamma`, where :math:`p_t` is the probability given to the
true outcome, so confidently right (mostly easy, majority-class) examples count less and the rare, hard ones more:

.. math:: \mathrm{FL}(p_t) = -\alpha_t (1 - p_t)^\gamma \log p_t

* single-label (softmax): :math:`p_t` is the softmax probability of the true class, and :math:`\alpha_t` an
  optional per-class weight of the true class;
* multi-label (sigmoid): each class is a binary problem, :math:`p_t = p` for positives and :math:`1 - p` for
  negatives, with :math:`\alpha_t = \alpha` for positives and :math:`1 - \alpha` for negatives (the paper's
  form), and an optional BCE-style ``pos_weight`` on the positive term.

With ``gamma=0`` and ``alpha=None`` it is exactly cross-entropy (single-label) or binary cross-entropy with
``pos_weight`` (multi-label). ``alpha=None`` means no class weighting (not the paper's 0.25).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["LOSSES", "focal_loss"]

LOSSES: tuple[str, ...] = ("cross_entropy", "focal")
"""Names accepted by ``ImageClassifier(loss=...)``."""


def focal_loss(
    logits: Tensor,
    targets: Tensor,
    gamma: float = 2.0,
    alpha: float | Sequence[float] | Tensor | None = None,
    multi_label: bool = False,
    pos_weight: Tensor | None = None,
) -> Tensor:
    """Focal loss, averaged over the batch (and, multi-label, over classes, like BCE's ``mean``).

    Args:
        logits: ``(B, C)`` raw scores.
        targets: ``(B,)`` class indices (single-label) or ``(B, C)`` 0/1 targets (multi-label).
        gamma: Focusing parameter, ``>= 0``; 0 gives (binary) cross-entropy.
        alpha: Single-label: ``None`` or one weight per class (a float is refused: it would only rescale the
            loss). Multi-label: ``None``, a float in ``[0, 1]`` for every class, or one value per class; positives
            get ``alpha``, negatives ``1 - alpha``.
        multi_label: Sigmoid focal loss on independent classes instead of the softmax one.
        pos_weight: Multi-label only: per-class weight of the positive term (as in
            ``binary_cross_entropy_with_logits``), e.g. negatives / positives per class.

    Returns:
        Scalar loss.

    Raises:
        ValueError: Negative ``gamma``, a float ``alpha`` for single-label, ``alpha`` of the wrong length, or
            ``pos_weight`` for single-label.

    Example:
        >>> logits, targets = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
        >>> bool(torch.isclose(focal_loss(logits, targets, gamma=0.0), F.cross_entropy(logits, targets)))
        True
        >>> focal_loss(logits, targets, gamma=2.0) < F.cross_entropy(logits, targets)
        tensor(True)
    """
    if gamma < 0:
        raise ValueError(f"focal loss gamma must be >= 0, got {gamma}.")
    num_classes = logits.shape[-1]
    weights = _alpha_tensor(alpha, num_classes, multi_label, logits)
    if multi_label:
        return _sigmoid_focal(logits, targets.to(logits.dtype), gamma, weights, pos_weight)
    if pos_weight is not None:
        raise ValueError("pos_weight applies to multi-label focal loss; for single-label pass per-class alpha.")
    log_probs = F.log_softmax(logits, dim=-1)
    log_pt = log_probs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    loss = -log_pt
    if gamma:
        # 1 - p_t, clamped away from 0 so that gamma < 1 keeps a finite gradient at p_t = 1
        one_minus = (-torch.expm1(log_pt)).clamp(min=torch.finfo(logits.dtype).tiny)
        loss = loss * one_minus.pow(gamma)
    if weights is not None:
        loss = loss * weights[targets.long()]
    return loss.mean()


def _sigmoid_focal(
    logits: Tensor, targets: Tensor, gamma: float, alpha: Tensor | None, pos_weight: Tensor | None
) -> Tensor:
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    positive = -targets * log_p
    negative = -(1 - targets) * log_not_p
    if gamma:  # (1 - p)^gamma = exp(gamma * log(1 - p)): smooth and finite everywhere
        positive = positive * torch.exp(gamma * log_not_p)
        negative = negative * torch.exp(gamma * log_p)
    if alpha is not None:
        positive, negative = positive * alpha, negative * (1 - alpha)
    if pos_weight is not None:
        positive = positive * pos_weight
    return (positive + negative).mean()


def _alpha_tensor(
    alpha: float | Sequence[float] | Tensor | None, num_classes: int, multi_label: bool, like: Tensor
) -> Tensor | None:
    if alpha is None:
        return None
    if isinstance(alpha, (int, float)):
        if not multi_label:
            raise ValueError(
                f"focal alpha={alpha} is a single number, which in softmax focal loss only rescales the loss. Pass "
                f"one weight per class ({num_classes} values), or None."
            )
        values = torch.full((num_classes,), float(alpha))
    else:
        values = torch.as_tensor(alpha, dtype=torch.float32).flatten()
        if values.numel() != num_classes:
            raise ValueError(f"focal alpha needs one value per class ({num_classes}), got {values.numel()}.")
    if multi_label and not bool(((values >= 0) & (values <= 1)).all()):
        raise ValueError(
            f"multi-label focal alpha must lie in [0, 1] (positives get alpha, negatives 1 - alpha): {alpha}"
        )
    return values.to(device=like.device, dtype=like.dtype)
