"""Rewards of a classification policy: ``reward(images, actions, targets, indices) -> (N,)`` tensors.

Three sources, all built by :func:`build_reward` from what a recipe says under ``reward:``:

* a cost matrix (``{"cost_matrix": [[...]]}``): ``reward = -cost[target, action]``; for multi-label, a ``2 x 2``
  matrix (or one per label, ``C x 2 x 2``) indexed ``[truth, decision]`` per label, summed over labels;
* a callable ``reward(images, actions, targets, indices)`` given in Python;
* a frozen reward model (``{"model": <.ckpt, adapter or nn.Module>}``): a classifier-shaped network whose output ``c``
  is the reward of action ``c`` (trained with the Bradley-Terry loss, :mod:`cvft.strategies.preference.reward_model`).
  An adapter (or timm name) sits on base weights: ``weights: <file or source>``, else the hub's (``pretrained``,
  true by default when no ``weights`` are given, as for a reference policy).

Without one, the reward is ``1`` for the right label and ``0`` otherwise (cost matrix ``1 - I``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from cvft.errors import StrategyError

__all__ = ["RewardFn", "CostMatrixReward", "ModelReward", "build_reward", "bayes_decisions"]

#: ``reward(images, actions, targets, indices) -> (N,)`` float tensor.
RewardFn = Callable[[Tensor, Tensor, "Tensor | None", "Tensor | None"], Tensor]


class CostMatrixReward:
    """``reward = -cost[target, action]`` (multi-label: summed over labels of ``-cost[label][truth, decision]``).

    Args:
        cost_matrix: ``C x C`` costs ``[true class][chosen class]`` (single-label), or ``2 x 2`` / ``C x 2 x 2``
            costs ``[truth][decision]`` per label (multi-label).

    Example:
        >>> import torch
        >>> reward = CostMatrixReward([[0.0, 1.0], [5.0, 0.0]])  # a missed positive costs 5x a false alarm
        >>> reward(None, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]), None).tolist()
        [-0.0, -5.0, -1.0]
    """

    def __init__(self, cost_matrix: Sequence[Sequence[float]] | Sequence[Sequence[Sequence[float]]] | Tensor) -> None:
        try:
            cost = torch.as_tensor(cost_matrix, dtype=torch.float32)
        except (TypeError, ValueError) as err:
            raise StrategyError(f"reward cost_matrix must be a list of lists of numbers, got {cost_matrix!r}.") from err
        square = cost.ndim == 2 and cost.shape[0] == cost.shape[1] and cost.shape[0] >= 2
        per_label = cost.ndim == 3 and cost.shape[1:] == (2, 2)
        if not (square or per_label) or not torch.isfinite(cost).all():
            raise StrategyError(
                f"reward cost_matrix of shape {tuple(cost.shape)}: give a finite C x C matrix [true class][chosen "
                "class] (single-label), or 2 x 2 / C x 2 x 2 [truth][decision] per label (multi-label)."
            )
        self.cost = cost

    def __call__(self, images: Any, actions: Tensor, targets: Tensor | None, indices: Tensor | None) -> Tensor:
        """The rewards of ``actions`` for ``targets``: ``(N,)``."""
        if targets is None:
            raise StrategyError("A cost-matrix reward needs the targets of the batch; train on labelled batches.")
        cost = self.cost.to(actions.device)
        if targets.ndim == 2:  # multi-label: per label [truth, decision]
            truth, decision = targets.round().long(), actions.long()
            if cost.ndim == 2:
                cost = cost.expand(truth.shape[1], 2, 2)
            if cost.shape[0] != truth.shape[1]:
                raise StrategyError(
                    f"reward cost_matrix has {cost.shape[0]} per-label 2 x 2 matrices for {truth.shape[1]} labels."
                )
            labels = torch.arange(truth.shape[1], device=truth.device).expand_as(truth)
            return -cost[labels, truth, decision].sum(-1)
        if cost.ndim != 2:
            raise StrategyError("A per-label (C x 2 x 2) cost_matrix is for multi-label targets; give C x C costs.")
        if actions.max() >= cost.shape[1] or targets.max() >= cost.shape[0]:
            raise StrategyError(
                f"reward cost_matrix is {cost.shape[0]} x {cost.shape[1]} but the model has more classes; give one "
                "row and one column per class."
            )
        return -cost[targets.long(), actions.long()]


class ModelReward:
    """A frozen reward model: the reward of action ``a`` is the model's output ``a`` (summed over chosen labels).

    The model is frozen here, kept outside the policy (not optimised, saved or wrapped by DDP), runs in eval mode
    under ``torch.no_grad`` and follows the images' device and dtype.

    Example:
        >>> import torch
        >>> reward = ModelReward(torch.nn.Flatten())
        >>> reward(torch.tensor([[1.0, 2.0]]), torch.tensor([1]), None, None).tolist()
        [2.0]
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model.requires_grad_(False).eval()

    def __call__(self, images: Tensor, actions: Tensor, targets: Tensor | None, indices: Tensor | None) -> Tensor:
        """The reward model's score of each row's action: ``(N,)``."""
        reference = next(self.model.parameters(), None)
        if reference is not None and reference.device != images.device:
            self.model.to(images.device)
        if self.model.training:
            self.model.eval()
        with torch.no_grad():
            scores = self.model(images).float()
        if actions.ndim == 2:
            return (scores * actions.to(scores.dtype)).sum(-1)
        return scores.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)


def _accuracy_reward(images: Any, actions: Tensor, targets: Tensor | None, indices: Tensor | None) -> Tensor:
    """1 for the right label (each right label, multi-label), else 0."""
    if targets is None:
        raise StrategyError("The default reward (1 for the right label) needs targets; give `reward` otherwise.")
    if targets.ndim == 2:
        return (actions.long() == targets.round().long()).float().sum(-1)
    return (actions.long() == targets.long()).float()


def build_reward(spec: RewardFn | Mapping[str, Any] | None) -> RewardFn:
    """The reward a strategy's ``reward`` option describes (see the module docstring).

    Raises:
        StrategyError: A mapping without exactly one of ``cost_matrix`` / ``model``, or a bad cost matrix.

    Example:
        >>> import torch
        >>> reward = build_reward({"cost_matrix": [[0, 1], [1, 0]]})
        >>> reward(None, torch.tensor([1]), torch.tensor([1]), None).tolist()
        [-0.0]
    """
    if spec is None:
        return _accuracy_reward
    if isinstance(spec, Mapping):
        keys = set(spec) & {"cost_matrix", "model"}
        extra = set(spec) - {"cost_matrix", "model", "weights", "pretrained"}
        if len(keys) != 1 or extra:
            raise StrategyError(
                f"reward {dict(spec)!r}: give exactly one of {{cost_matrix: [[...]]}} (reward = -cost[target, action]) "
                "or {model: <reward model .ckpt / adapter / timm name>}, or a callable in Python."
            )
        if "cost_matrix" in spec:
            return CostMatrixReward(spec["cost_matrix"])
        model = spec["model"]
        if isinstance(model, nn.Module):
            return ModelReward(model)
        from cvft.strategies.distillation.teacher import teacher_loader

        loader = teacher_loader()
        loader.check(str(model))
        weights = spec.get("weights")
        pretrained = bool(spec.get("pretrained", weights is None))  # base weights from the hub unless given
        return ModelReward(loader.load(str(model), weights, pretrained))
    if callable(spec):
        return spec
    raise StrategyError(f"Cannot use {spec!r} as a reward: give {{cost_matrix: ...}}, {{model: ...}} or a callable.")


def bayes_decisions(probs: Tensor, cost_matrix: Sequence[Sequence[float]] | Tensor) -> Tensor:
    """The Bayes-optimal decision of each row: the action of least expected cost ``sum_y p(y | x) cost[y, a]``.

    This is the decision rule a calibrated supervised model should use under a cost matrix (no fine-tuning).

    Example:
        >>> import torch
        >>> bayes_decisions(torch.tensor([[0.7, 0.3]]), [[0.0, 1.0], [5.0, 0.0]]).tolist()  # 0.3 * 5 > 0.7 * 1
        [1]
    """
    cost = torch.as_tensor(cost_matrix, dtype=torch.float32, device=probs.device)
    return (probs.float() @ cost).argmin(-1)
