"""The distillation losses, as plain functions of tensors: logit distillation and projected feature matching."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["kd_loss", "feature_distillation_loss"]


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Knowledge-distillation loss of Hinton et al. (2015): ``T^2 * KL(softmax(t / T) || softmax(s / T))``.

    The KL divergence is summed over classes and averaged over the rows (``batchmean``); the ``T^2`` factor keeps
    the gradient's scale independent of the temperature, so the term can be mixed with cross-entropy. Computed in
    float32; no gradient flows into ``teacher_logits``.

    Args:
        student_logits: ``(N, C)`` logits of the student.
        teacher_logits: ``(N, C)`` logits of the teacher for the same rows.
        temperature: Softening temperature ``T > 0`` (1 is plain softmax; 2-8 are common).

    Returns:
        A scalar tensor.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[1.0, 2.0, 3.0]])
        >>> float(kd_loss(logits, logits, temperature=2.0))
        0.0
        >>> round(float(kd_loss(torch.zeros(1, 2), torch.tensor([[0.0, 2.0]]), temperature=1.0)), 4)
        0.3278
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"kd_loss needs student and teacher logits of the same shape, got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}."
        )
    if not temperature > 0:
        raise ValueError(f"kd_loss temperature must be > 0, got {temperature}.")
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    divergence = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return divergence * temperature**2


def feature_distillation_loss(
    student_features: Tensor, teacher_features: Tensor, projection: nn.Module | None = None
) -> Tensor:
    """Mean squared error between (projected) student features and the teacher's features (FitNets-style hints).

    Args:
        student_features: ``(N, D_s)`` pooled pre-logit features of the student.
        teacher_features: ``(N, D_t)`` pooled pre-logit features of the teacher for the same rows (no gradient).
        projection: Maps ``D_s`` to ``D_t`` (a learned ``nn.Linear``); ``None`` needs ``D_s == D_t``.

    Returns:
        A scalar tensor: the mean over rows and feature dimensions.

    Example:
        >>> import torch
        >>> student, teacher = torch.ones(2, 3), torch.zeros(2, 4)
        >>> projection = torch.nn.Linear(3, 4)
        >>> _ = torch.nn.init.constant_(projection.weight, 0.5), torch.nn.init.zeros_(projection.bias)
        >>> float(feature_distillation_loss(student, teacher, projection).detach())
        2.25
    """
    projected = projection(student_features) if projection is not None else student_features
    if projected.shape != teacher_features.shape:
        raise ValueError(
            f"feature_distillation_loss: (projected) student features {tuple(projected.shape)} do not match the "
            f"teacher's {tuple(teacher_features.shape)}; give a projection from the student's to the teacher's width."
        )
    return F.mse_loss(projected.float(), teacher_features.detach().float())
