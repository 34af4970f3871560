"""One-step rollouts of a classification policy and the gradient step that PPO's inner epochs take.

A rollout is a batch of images, the actions the current policy sampled for them, their log-probabilities under that
(old) policy, the rewards and the advantages (rewards minus their mean, divided by their standard deviation, both
pooled over DDP ranks: the bandit case of Schulman et al., with no value function or GAE), and the reference policy's
logits for the KL penalty.

The policy runs in eval mode for the rollout and for every update on it (:func:`~cvft.strategies.base.eval_mode`):
BatchNorm uses its running statistics and dropout is off, so the probability ratio is exactly 1 before the first update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cvft.strategies.base import eval_mode
from cvft.strategies.preference._distributed import average_gradients, global_mean_std
from cvft.strategies.preference.policy import action_log_probs, sample_actions
from cvft.strategies.preference.reference import ReferencePolicy
from cvft.strategies.preference.rewards import RewardFn

__all__ = ["Rollout", "collect_rollout", "trainable_parameters", "gradient_step"]


@dataclass
class Rollout:
    """A batch of one-step episodes of a classification policy.

    Attributes:
        images: ``(N, ...)`` inputs.
        actions: ``(N,)`` sampled classes, or ``(N, C)`` 0/1 rows for multi-label.
        old_logits: ``(N, C)`` logits of the policy that sampled them (no gradient).
        old_log_probs: ``(N,)`` ``log pi_old(a | x)``.
        rewards: ``(N,)`` rewards.
        advantages: ``(N,)`` advantages.
        reference_logits: ``(N, C)`` logits of the reference policy, or ``None`` when no KL penalty is needed.
        multi_label: Bernoulli policies per label.
    """

    images: Tensor
    actions: Tensor
    old_logits: Tensor
    old_log_probs: Tensor
    rewards: Tensor
    advantages: Tensor
    reference_logits: Tensor | None
    multi_label: bool = False

    def __len__(self) -> int:
        return len(self.images)

    def rows(self, index: Tensor) -> Rollout:
        """The rollout restricted to the rows ``index``."""
        ref = None if self.reference_logits is None else self.reference_logits[index]
        return Rollout(
            self.images[index], self.actions[index], self.old_logits[index], self.old_log_probs[index],
            self.rewards[index], self.advantages[index], ref, self.multi_label,
        )  # fmt: skip


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require gradients, in model order."""
    return [p for p in model.parameters() if p.requires_grad]


def collect_rollout(
    model: nn.Module,
    images: Tensor,
    targets: Tensor | None,
    reward: RewardFn,
    multi_label: bool,
    reference: ReferencePolicy | None = None,
    indices: Tensor | None = None,
    normalize: bool = True,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample actions from ``model`` (eval mode), score them with ``reward`` and compute advantages.

    Advantages are ``r - mean(r)`` over every rank's rows, divided by their standard deviation when ``normalize``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 3)
        >>> rollout = collect_rollout(model, torch.randn(4, 2), torch.zeros(4, dtype=torch.long),
        ...                           lambda x, a, t, i: (a == t).float(), multi_label=False)
        >>> rollout.actions.shape, float(rollout.advantages.sum().abs()) < 1e-5
        (torch.Size([4]), True)
    """
    with eval_mode(model), torch.no_grad():
        old_logits = model(images).float()
        actions = sample_actions(old_logits, multi_label, generator)
        old_log_probs = action_log_probs(old_logits, actions, multi_label)
        ref_logits = None if reference is None else reference.logits(model, images)
    rewards = reward(images, actions, targets, indices).detach().float().reshape(-1)
    if rewards.shape[0] != len(images):
        raise ValueError(f"The reward gave {rewards.shape[0]} values for {len(images)} images; give one per image.")
    mean, std = global_mean_std(rewards)
    advantages = rewards - mean
    if normalize:
        advantages = advantages / (std + 1e-8)
    return Rollout(images, actions, old_logits, old_log_probs, rewards, advantages, ref_logits, multi_label)


def gradient_step(loss: Tensor, parameters: Sequence[nn.Parameter], optimizer_step: Callable[[], None]) -> list[Tensor]:
    """Gradients of ``loss`` by ``parameters`` (averaged over DDP ranks) into ``.grad``, then ``optimizer_step()``.

    The gradients are computed with :func:`torch.autograd.grad`, outside DDP's reducer, and averaged explicitly, so
    any number of inner steps per training batch is allowed. Returns the averaged gradients.
    """
    grads = torch.autograd.grad(loss, list(parameters), allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads, strict=True)]
    grads = average_gradients(grads)
    for param, grad in zip(parameters, grads, strict=True):
        param.grad = grad.to(param.dtype)
    optimizer_step()
    return grads
