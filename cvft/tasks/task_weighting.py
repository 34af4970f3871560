"""How the losses of several tasks combine in multi-task fine-tuning: fixed weights or learned uncertainty.

:class:`~cvft.tasks.multitask.MultiTaskClassifier` draws every training batch from one task, so a weighting scheme
turns *that task's* loss ``L_t`` into the loss that is back-propagated:

================  ======================================================================================
``equal``         ``L_t`` (every task weighs 1; how often a task is trained is the sampler's ``ratios``)
``fixed``         ``w_t * L_t`` with ``loss_weights = {task: w_t}`` (tasks left out weigh 1)
``uncertainty``   ``exp(-s_t) * L_t + s_t`` with a learned log-variance ``s_t`` per task (Kendall et al.)
================  ======================================================================================

Over an epoch the gradient of the shared backbone is therefore ``sum_t p_t * weight_t * grad L_t``, where ``p_t``
is the probability the sampler draws task ``t``: sampling ratios and loss weights multiply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from cvft.errors import CvftError

__all__ = ["WEIGHTINGS", "TaskWeighting", "FixedWeighting", "UncertaintyWeighting", "build_task_weighting"]

#: Names accepted by ``MultiTaskClassifier(weighting=...)``.
WEIGHTINGS = ("equal", "fixed", "uncertainty")


class TaskWeighting(nn.Module):
    """Base class: maps ``(task, task loss)`` to the loss to optimise.

    Args:
        task_names: The tasks, in a fixed order (the order of any per-task parameters).
    """

    def __init__(self, task_names: Sequence[str]) -> None:
        super().__init__()
        self.task_names = list(task_names)
        if not self.task_names:
            raise CvftError("A task weighting needs at least one task.")

    def index(self, task: str) -> int:
        """Position of ``task`` in :attr:`task_names`."""
        try:
            return self.task_names.index(task)
        except ValueError:
            raise CvftError(f"Unknown task {task!r}; the tasks are {self.task_names}.") from None

    def forward(self, task: str, loss: Tensor) -> Tensor:
        """The weighted loss of a batch of ``task`` whose unweighted loss is ``loss``."""
        raise NotImplementedError

    def weight(self, task: str) -> float:
        """The current multiplier of ``task``'s loss (for logging)."""
        raise NotImplementedError


class FixedWeighting(TaskWeighting):
    """Constant per-task weights: ``w_t * L_t``.

    Args:
        task_names: The tasks.
        loss_weights: Weight by task name (finite, ``>= 0``); tasks left out weigh 1. ``None``: all 1 ("equal").

    Example:
        >>> import torch
        >>> weighting = FixedWeighting(["shape", "colour"], {"colour": 0.5})
        >>> weighting("colour", torch.tensor(2.0)), weighting.weight("shape")
        (tensor(1.), 1.0)
    """

    def __init__(self, task_names: Sequence[str], loss_weights: Mapping[str, float] | None = None) -> None:
        super().__init__(task_names)
        given = dict(loss_weights or {})
        unknown = sorted(set(given) - set(self.task_names))
        if unknown:
            raise CvftError(f"loss_weights names unknown tasks {unknown}; the tasks are {self.task_names}.")
        for task, value in given.items():
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise CvftError(f"loss_weights[{task!r}] must be a finite number >= 0, got {value!r}.")
        self.weights = {task: float(given.get(task, 1.0)) for task in self.task_names}

    def forward(self, task: str, loss: Tensor) -> Tensor:
        """``w_t * loss``."""
        weight = self.weights[self.task_names[self.index(task)]]
        return loss if weight == 1.0 else loss * weight

    def weight(self, task: str) -> float:
        """``w_t``."""
        return self.weights[self.task_names[self.index(task)]]


class UncertaintyWeighting(TaskWeighting):
    """Homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018), one learned ``s_t`` per task.

    The loss of a batch of task ``t`` is ``exp(-s_t) * L_t + s_t`` with ``s_t = log sigma_t^2`` a trainable
    parameter (:attr:`log_vars`, saved in checkpoints, optimised without weight decay). For a fixed ``L_t`` it is
    minimised at ``s_t = log L_t``: tasks with a larger loss get a smaller weight ``exp(-s_t)``, and the ``+ s_t``
    term keeps the weights from collapsing to 0.

    Which form, and why: the paper's classification loss (its eq. 10, a softmax with temperature ``sigma^2``) is
    ``L_t / sigma_t^2 + log sigma_t = exp(-s_t) L_t + s_t / 2``; its regression loss carries an extra ``1/2`` on
    ``L_t``. We use ``exp(-s_t) L_t + s_t``, i.e. the regulariser ``log sigma_t^2`` instead of ``log sigma_t``:
    no ``1/2`` factors, since every task here is classification and one expression serves them all, and ``s_t``
    is then simply the log of the loss scale it balances. The two forms differ by a constant factor 2 in the
    optimum weight (``1 / L_t`` here, ``1 / (2 L_t)`` with ``s_t / 2``), the same for every task, so the relative
    weighting of the tasks is identical.

    Args:
        task_names: The tasks.
        init_log_var: Initial ``s_t`` for every task (0: every weight starts at 1).

    Example:
        >>> import torch
        >>> weighting = UncertaintyWeighting(["shape", "colour"])
        >>> with torch.no_grad():
        ...     _ = weighting.log_vars.fill_(math.log(2.0))
        >>> round(weighting("colour", torch.tensor(3.0)).item(), 4)  # 3 / 2 + log 2
        2.1931
    """

    def __init__(self, task_names: Sequence[str], init_log_var: float = 0.0) -> None:
        super().__init__(task_names)
        self.log_vars = nn.Parameter(torch.full((len(self.task_names),), float(init_log_var)))

    def forward(self, task: str, loss: Tensor) -> Tensor:
        """``exp(-s_t) * loss + s_t``."""
        log_var = self.log_vars[self.index(task)].to(loss.dtype)
        return torch.exp(-log_var) * loss + log_var

    def weight(self, task: str) -> float:
        """``exp(-s_t)``."""
        return float(torch.exp(-self.log_vars[self.index(task)].detach()))


def build_task_weighting(
    task_names: Sequence[str], weighting: str | None = None, loss_weights: Mapping[str, float] | None = None
) -> TaskWeighting:
    """Build the weighting named by ``weighting`` (``None``: ``"fixed"`` with ``loss_weights``, else ``"equal"``).

    Example:
        >>> type(build_task_weighting(["a", "b"], "uncertainty")).__name__
        'UncertaintyWeighting'
        >>> build_task_weighting(["a", "b"], loss_weights={"a": 2.0}).weights
        {'a': 2.0, 'b': 1.0}
    """
    if weighting is None:
        weighting = "fixed" if loss_weights else "equal"
    if weighting not in WEIGHTINGS:
        raise CvftError(f"Unknown weighting {weighting!r}; choose one of {list(WEIGHTINGS)}.")
    if weighting == "equal":
        if loss_weights:
            raise CvftError("weighting='equal' ignores loss_weights; pass weighting='fixed' to use them.")
        return FixedWeighting(task_names)
    if weighting == "fixed":
        if not loss_weights:
            raise CvftError("weighting='fixed' needs loss_weights={task: weight}; or use weighting='equal'.")
        return FixedWeighting(task_names, loss_weights)
    if loss_weights:
        raise CvftError("weighting='uncertainty' learns the weights; leave loss_weights out.")
    return UncertaintyWeighting(task_names)
