r"""Supervised contrastive loss (SupCon, Khosla et al. 2020, eq. 2: the "L_out" form) and its per-anchor parts.

For embeddings ``z`` (L2-normalised here) of ``N`` rows - every augmented view of every image is a row - and
class labels ``y``, the loss of anchor ``i`` is

.. math::

    \ell_i = -\frac{1}{|P(i)|} \sum_{p \in P(i)}
        \log \frac{\exp(z_i \cdot z_p / T)}{\sum_{a \ne i} \exp(z_i \cdot z_a / T)},
    \qquad P(i) = \{p \ne i : y_p = y_i\},

and the loss is ``T / base_T`` times the mean of ``l_i`` over the anchors that have at least one positive. Anchors
without a positive (a class seen once in a single-view batch) have no defined term and are left out of the mean;
with two views every anchor has its other view as a positive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cvft.errors import StrategyError

__all__ = ["supcon_loss", "supcon_anchor_losses", "check_class_labels"]


def check_class_labels(labels: Tensor, rows: int) -> Tensor:
    """Return ``labels`` as a ``(rows,)`` integer tensor, or refuse multi-label / soft targets with a clear error.

    Example:
        >>> import torch
        >>> check_class_labels(torch.tensor([0, 2, 1]), 3).tolist()
        [0, 2, 1]
    """
    if labels.ndim != 1 or labels.is_floating_point():
        raise StrategyError(
            f"Supervised contrastive learning needs one class index per sample (a 1-d integer tensor), got targets of "
            f"shape {tuple(labels.shape)} and dtype {labels.dtype}. Multi-label or soft (mixup / cutmix) targets have "
            "no single notion of 'same class': train those with multi_label=True and without 'supcon', or turn "
            "mixup/cutmix off."
        )
    if labels.shape[0] != rows:
        raise StrategyError(f"Got {labels.shape[0]} labels for {rows} embeddings; give one label per row (per view).")
    return labels


def supcon_anchor_losses(
    anchors: Tensor, contrast: Tensor, anchor_labels: Tensor, contrast_labels: Tensor, anchor_rows: Tensor, temperature
) -> tuple[Tensor, Tensor]:
    """Per-anchor SupCon terms ``l_i`` of ``anchors`` against every row of ``contrast``, and which anchors count.

    Both inputs must already be L2-normalised. ``anchor_rows[k]`` is the row of ``contrast`` that *is* anchor ``k``
    (it is neither its own positive nor in its own denominator). This is the building block of
    :func:`supcon_loss` and of the distributed version, where each process owns some anchors and contrasts them with
    the gathered global batch.

    Args:
        anchors: ``(M, D)`` normalised anchor embeddings.
        contrast: ``(N, D)`` normalised embeddings of the whole batch (the anchors included).
        anchor_labels: ``(M,)`` class indices of the anchors.
        contrast_labels: ``(N,)`` class indices of ``contrast``.
        anchor_rows: ``(M,)`` position of each anchor in ``contrast``.
        temperature: Softmax temperature ``T``.

    Returns:
        ``(losses, valid)``: ``(M,)`` terms (0 where ``valid`` is false) and ``(M,)`` booleans, true for anchors with
        at least one positive.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> z = F.normalize(torch.randn(4, 3), dim=1)
        >>> losses, valid = supcon_anchor_losses(z, z, torch.tensor([0, 0, 1, 2]), torch.tensor([0, 0, 1, 2]),
        ...                                      torch.arange(4), 0.1)
        >>> valid.tolist()
        [True, True, False, False]
    """
    similarity = anchors @ contrast.T / temperature  # (M, N)
    # subtract each row's maximum before exponentiating (the log-softmax below is unchanged by it)
    similarity = similarity - similarity.detach().max(dim=1, keepdim=True).values
    others = torch.ones_like(similarity, dtype=torch.bool)
    others[torch.arange(len(anchors), device=anchors.device), anchor_rows] = False  # a != i
    log_denominator = torch.logsumexp(similarity.masked_fill(~others, float("-inf")), dim=1, keepdim=True)
    log_prob = similarity - log_denominator
    positives = (anchor_labels[:, None] == contrast_labels[None, :]) & others
    counts = positives.sum(dim=1)
    valid = counts > 0
    summed = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    losses = torch.where(valid, -summed / counts.clamp(min=1), torch.zeros_like(summed))
    return losses, valid


def supcon_loss(
    embeddings: Tensor, labels: Tensor, temperature: float = 0.1, base_temperature: float | None = None
) -> Tensor:
    """Supervised contrastive loss of a batch of embeddings (all views as rows) with class labels.

    Args:
        embeddings: ``(N, D)`` projections; every view of an image is its own row (e.g. view-major ``V * B`` rows).
            They are L2-normalised here and the loss is computed in float32.
        labels: ``(N,)`` class indices, one per row (repeat the image's label for each view). Multi-label or soft
            targets are refused: "same class" is not defined for them.
        temperature: Softmax temperature ``T`` (the paper uses 0.1 for fine-tuning-sized batches).
        base_temperature: The reference implementation multiplies the loss by ``T / base_temperature``; ``None``
            (the default) means ``base_temperature = T``, a factor of 1.

    Returns:
        A scalar: the mean of the per-anchor terms over anchors with at least one positive (others are excluded),
        times ``T / base_temperature``. If no anchor has a positive, a zero that keeps the graph.

    Example:
        >>> import torch
        >>> z = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> clustered = supcon_loss(z, torch.tensor([0, 0, 1, 1]))
        >>> mixed = supcon_loss(z, torch.tensor([0, 1, 0, 1]))
        >>> bool(clustered < mixed)
        True
    """
    if embeddings.ndim != 2:
        raise StrategyError(f"supcon_loss expects (N, D) embeddings, got shape {tuple(embeddings.shape)}.")
    labels = check_class_labels(labels, embeddings.shape[0])
    if temperature <= 0:
        raise StrategyError(f"temperature must be > 0, got {temperature}.")
    z = F.normalize(embeddings.float(), dim=1)
    if len(z) < 2:  # nothing to contrast with: a zero that keeps the graph
        return z.sum() * 0.0
    rows = torch.arange(len(z), device=z.device)
    losses, valid = supcon_anchor_losses(z, z, labels, labels, rows, temperature)
    scale = temperature / (base_temperature if base_temperature is not None else temperature)
    return scale * losses.sum() / valid.sum().clamp(min=1)
