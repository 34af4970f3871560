"""Learning without Forgetting (Li & Hoiem, 2016): distil the previous model's outputs on the new task's images."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvft.errors import StrategyError
from cvft.strategies.continual.base import ContinualStrategy
from cvft.strategies.continual.multihead import is_multi_head
from cvft.strategies.outputs import StepOutputs
from cvft.strategies.registry import register_strategy

__all__ = ["LwF", "distillation_loss"]


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 2.0) -> Tensor:
    """``KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch.

    Li & Hoiem write the cross-entropy ``-sum softmax(teacher/T) log softmax(student/T)``; the KL divergence differs
    from it by the teacher's entropy, a constant, so the gradients are the same and the term is 0 when student and
    teacher agree. No ``T^2`` factor (the paper has none; ``lam`` absorbs it).

    Example:
        >>> import torch
        >>> logits = torch.randn(4, 3)
        >>> float(distillation_loss(logits, logits))
        0.0
    """
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


@register_strategy
class LwF(ContinualStrategy):
    """Learning without Forgetting: keep the old tasks' outputs on the new task's images where they were.

    Before each new task (:meth:`begin_task`) a frozen copy of the model is recorded: eval mode, no gradients,
    not a sub-module (it is neither trained nor saved with the weights). While the new task trains, the loss gains
    ``lam * sum_k KD_T(old head k now, old head k recorded)`` over every earlier task ``k`` of a
    :class:`~cvft.strategies.continual.MultiHeadNet`, computed on the *new* task's images (no old data needed),
    with :func:`distillation_loss` at temperature ``T = 2`` as in the paper. On a single-head timm model (plain
    ``cvft fit``) the recorded model is the one at :meth:`setup` and the term distils its full output: fine-tuning
    that stays close to the starting model's predictions. With ``lam = 0`` this is plain supervised fine-tuning.

    Args:
        lam: Weight ``lambda_o`` of the distillation term (1 in the paper).
        temperature: Distillation temperature ``T``.

    Example:
        >>> import timm, torch
        >>> from cvft.strategies.continual import MultiHeadNet
        >>> net = MultiHeadNet(timm.create_model("test_resnet", num_classes=0), [3, 3])
        >>> lwf = LwF()
        >>> lwf.setup(net)
        >>> net.active_task = 1
        >>> lwf.begin_task(net, 1)
        >>> images = torch.randn(2, 3, 32, 32)
        >>> _ = net.eval()  # same BatchNorm mode as the recorded copy: nothing has changed yet
        >>> outputs = StepOutputs(logits=net(images), images=images, features=net.forward_features(images))
        >>> round(float(lwf.loss_terms(net, None, outputs)["distill"].detach()), 6)
        0.0
    """

    name = "lwf"
    needs_features = True

    def __init__(self, lam: float = 1.0, temperature: float = 2.0) -> None:
        if not lam >= 0.0:
            raise StrategyError(f"lwf: lam must be >= 0, got {lam}.")
        if not temperature > 0.0:
            raise StrategyError(f"lwf: temperature must be > 0, got {temperature}.")
        self.lam = float(lam)
        self.temperature = float(temperature)
        self._teacher: nn.Module | None = None
        self._pending: dict[str, Tensor] | None = None

    def _record(self, model: nn.Module) -> None:
        teacher = copy.deepcopy(model).eval()
        teacher.requires_grad_(False)
        self._teacher = teacher
        self._pending = None

    def setup(self, model: nn.Module) -> None:
        """On a single-head model, record it as the model to stay close to."""
        if not is_multi_head(model):
            self._record(model)

    def begin_task(self, model: nn.Module, task: int) -> None:
        """Record the model as it is now (after the previous tasks), before training task ``task``."""
        if task > 0 or not is_multi_head(model):
            self._record(model)

    def _teacher_for(self, model: nn.Module) -> nn.Module | None:
        if self._pending is not None:  # restored from a checkpoint: rebuild the frozen copy on this model
            state = self._pending
            self._record(model)
            self._teacher.load_state_dict(state)
        return self._teacher

    def loss_terms(self, model: nn.Module, batch: Any, outputs: StepOutputs) -> dict[str, Tensor]:
        """``{"distill": lam * sum over old heads of KD}`` (nothing before there is an old task)."""
        teacher = self._teacher_for(model)
        if teacher is None:
            return {}
        images = outputs.images
        if not is_multi_head(model):
            with torch.no_grad():
                old = teacher(images)
            return {"distill": self.lam * distillation_loss(outputs.logits, old, self.temperature)}
        old_tasks = range(model.active_task)
        if not old_tasks:
            return {}
        features = outputs.features if outputs.features is not None else model.forward_features(images)
        with torch.no_grad():
            old_features = teacher.forward_features(images)
        total = outputs.logits.new_zeros(())
        for task in old_tasks:
            with torch.no_grad():
                old = teacher.heads[task](old_features)
            total = total + distillation_loss(model.heads[task](features), old, self.temperature)
        return {"distill": self.lam * total}

    def state_dict(self) -> dict[str, Any]:
        """The recorded model's tensors, when there is one."""
        if self._pending is not None:
            return {"teacher": dict(self._pending)}
        if self._teacher is None:
            return {}
        return {"teacher": {k: v.detach().clone() for k, v in self._teacher.state_dict().items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Keep the recorded tensors; the frozen copy is rebuilt on the model at the next loss computation."""
        teacher = state.get("teacher")
        self._teacher = None
        self._pending = {k: v.clone() for k, v in teacher.items()} if teacher else None
