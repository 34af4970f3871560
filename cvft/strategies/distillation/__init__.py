"""Teacher-student knowledge distillation: strategy ``distillation`` and its losses.

Example:
    >>> import torch
    >>> from cvft.strategies.distillation import kd_loss
    >>> float(kd_loss(torch.zeros(2, 3), torch.zeros(2, 3)))
    0.0
"""

from cvft.strategies.distillation.loss import feature_distillation_loss, kd_loss
from cvft.strategies.distillation.strategy import PROJECTION_NAME, Distillation
from cvft.strategies.distillation.teacher import load_teacher, teacher_kind

__all__ = ["Distillation", "PROJECTION_NAME", "kd_loss", "feature_distillation_loss", "load_teacher", "teacher_kind"]
