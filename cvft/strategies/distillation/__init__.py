"""Teacher-student knowledge distillation: strategy ``distillation`` and its losses.

The teacher is a loaded network or a name that a teacher loader builds (:mod:`cvft.strategies.distillation.teacher`);
reading cvft's checkpoint and adapter files as teachers is the task layer's (:mod:`cvft.tasks.teachers`).

Example:
    >>> import torch
    >>> from cvft.strategies.distillation import kd_loss
    >>> float(kd_loss(torch.zeros(2, 3), torch.zeros(2, 3)))
    0.0
"""

from cvft._deprecation import moved_names
from cvft.strategies.distillation.loss import feature_distillation_loss, kd_loss
from cvft.strategies.distillation.strategy import PROJECTION_NAME, Distillation
from cvft.strategies.distillation.teacher import TeacherLoader, register_teacher_loader

__all__ = [
    "Distillation",
    "PROJECTION_NAME",
    "kd_loss",
    "feature_distillation_loss",
    "TeacherLoader",
    "register_teacher_loader",
]

#: Reading cvft's files as teachers moved up to the task layer: deprecated aliases.
__getattr__ = moved_names(__name__, {"load_teacher": "cvft.tasks.teachers", "teacher_kind": "cvft.tasks.teachers"})
