"""The ``reward_model`` objective: train a classifier-shaped network as a reward model with the Bradley-Terry loss.

The network's output ``a`` for an image is the reward ``r(x, a)`` of choosing label ``a``. On preference pairs
(:mod:`cvft.data.preference`) the loss is ``-mean(w log sigmoid(r(x, y_w) - r(x, y_l)))``. For multi-label pairs
(label sets) the score of a set is the sum of the outputs of its labels, ``r(x, y) = sum_c y_c r_c(x)``, as
:class:`~cvft.strategies.preference.rewards.ModelReward` scores a multi-label action. The trained checkpoint (or
adapter) is then the frozen reward of ``reinforce``, ``ppo`` or ``trpo``: ``reward: {model: <its .ckpt>}``
(:class:`~cvft.strategies.preference.rewards.ModelReward`). Any parameter strategy chooses what trains: a linear
probe makes it a small head on the frozen backbone's features.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from cvft.data.preference import split_pair_targets
from cvft.strategies.base import Strategy
from cvft.strategies.outputs import StepOutputs
from cvft.strategies.preference.losses import bradley_terry_loss
from cvft.strategies.registry import register_strategy

__all__ = ["RewardModel", "set_scores"]


@register_strategy
class RewardModel(Strategy):
    """Bradley-Terry reward-model training on preference pairs (see the module docstring).

    Compared with supervised fine-tuning, the outputs are trained as scores whose differences predict which of two
    labels people prefer, not as class probabilities. It replaces the supervised loss.

    Example:
        >>> import torch
        >>> from cvft.strategies.outputs import StepOutputs
        >>> logits, pairs = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0, 1.0]])
        >>> round(float(RewardModel().loss_terms(None, None, StepOutputs(logits, None, pairs))["bradley_terry"]), 4)
        0.3133
    """

    name = "reward_model"
    objective = True
    pair_targets = True
    task_loss_weight = 0.0

    def loss_terms(self, model: nn.Module, batch: Any, outputs: StepOutputs) -> dict[str, Tensor]:
        """``{"bradley_terry": ...}`` on the batch's pairs."""
        scores = outputs.logits.float()
        preferred, rejected, weights = split_pair_targets(outputs.targets, num_classes=scores.shape[-1])
        loss = bradley_terry_loss(set_scores(scores, preferred), set_scores(scores, rejected), weights)
        return {"bradley_terry": loss}


def set_scores(scores: Tensor, labels: Tensor) -> Tensor:
    """``(N,)`` score of each row's label: ``scores[label]``, or for multi-hot rows the sum over the set's labels.

    Example:
        >>> import torch
        >>> scores = torch.tensor([[1.0, 2.0, 4.0]])
        >>> set_scores(scores, torch.tensor([2])).tolist(), set_scores(scores, torch.tensor([[1.0, 0.0, 1.0]])).tolist()
        ([4.0], [5.0])
    """
    if labels.ndim == 2:
        return (scores * labels.to(scores.dtype)).sum(-1)
    return scores.gather(-1, labels.long()[:, None]).squeeze(-1)
