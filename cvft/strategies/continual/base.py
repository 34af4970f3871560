"""What the continual-learning objectives share: the two moments between tasks and which parameters they watch."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from cvft.strategies.aux import AUX_ATTR
from cvft.strategies.base import LossFn, Strategy

__all__ = ["ContinualStrategy", "watched_parameters"]


def watched_parameters(model: nn.Module, exclude: set[str] = frozenset()) -> Iterable[tuple[str, nn.Parameter]]:
    """Trainable parameters of ``model`` a regulariser may act on: not training-only aux modules, not ``exclude``."""
    for name, param in model.named_parameters():
        if param.requires_grad and not name.startswith(f"{AUX_ATTR}.") and name not in exclude:
            yield name, param


class ContinualStrategy(Strategy):
    """An objective for a sequence of tasks: it adds loss terms and hears when a task begins and ends.

    :func:`cvft.continual.run_continual` calls :meth:`begin_task` before training each task (after setting the
    model's active task) and :meth:`consolidate` after it. Used once, in a single ``cvft fit``, the strategy acts
    relative to the weights it saw at ``setup`` (the pretrained model).

    Objectives only add loss terms: list parameter strategies (``lora``, ``linear_probe``) *before* them, so they
    see which parameters train.
    """

    name = "continual"
    objective = True

    def begin_task(self, model: nn.Module, task: int) -> None:
        """Called before training task ``task`` (0-based) on ``model``."""

    def consolidate(self, model: nn.Module, batches: Iterable[tuple[Tensor, ...]], loss_fn: LossFn) -> None:
        """Called after training a task, with that task's ``(images, targets, ...)`` batches and its loss."""
