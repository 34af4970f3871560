"""The preference and policy-gradient losses, as plain functions of tensors (all means over the rows).

* :func:`reinforce_loss`: Williams (1992), ``-mean(A * log pi(a | x))``;
* :func:`ppo_clip_loss`: Schulman et al. (2017), ``-mean(min(r A, clip(r, 1 - eps, 1 + eps) A))`` with the
  probability ratio ``r = pi(a | x) / pi_old(a | x)``;
* :func:`kl_penalty`: the mean exact ``KL(pi || pi_ref)`` of the rows;
* :func:`bradley_terry_loss`: ``-mean(w log sigmoid(r_w - r_l))``, the negative log-likelihood of the preferred of two
  scores under the Bradley-Terry model;
* :func:`dpo_loss`: Rafailov et al. (2023), ``-mean(w log sigmoid(beta h))``;
* :func:`ipo_loss`: Azar et al. (2023), ``mean(w (h - 1 / (2 tau))^2)``;

where ``h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))`` for a preferred label ``y_w`` and a
rejected one ``y_l``. Advantages, old log-probabilities and reference log-probabilities carry no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cvft.strategies.preference.policy import policy_kl

__all__ = [
    "normalize_advantages",
    "reinforce_loss",
    "ppo_clip_loss",
    "kl_penalty",
    "bradley_terry_loss",
    "preference_margin",
    "dpo_loss",
    "ipo_loss",
]


def _weighted_mean(values: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return values.mean()
    weights = weights.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(torch.finfo(values.dtype).tiny)


def normalize_advantages(advantages: Tensor, mean: Tensor | None = None, std: Tensor | None = None) -> Tensor:
    """``(A - mean) / (std + 1e-8)``; the batch's own mean and standard deviation unless given (DDP: global ones).

    Example:
        >>> import torch
        >>> [round(a, 4) for a in normalize_advantages(torch.tensor([1.0, 3.0])).tolist()]
        [-0.7071, 0.7071]
    """
    advantages = advantages.detach().float()
    if mean is None:
        mean = advantages.mean()
    if std is None:
        std = advantages.std() if advantages.numel() > 1 else advantages.new_zeros(())
    return (advantages - mean) / (std + 1e-8)


def reinforce_loss(log_probs: Tensor, advantages: Tensor) -> Tensor:
    """REINFORCE (Williams, 1992): ``-mean(A * log pi(a | x))``; its gradient is the policy-gradient estimate.

    Example:
        >>> import torch
        >>> log_probs = torch.log(torch.tensor([0.5, 0.25])).requires_grad_()
        >>> reinforce_loss(log_probs, torch.tensor([1.0, -2.0])).backward()
        >>> log_probs.grad.tolist()
        [-0.5, 1.0]
    """
    return -(advantages.detach().float() * log_probs.float()).mean()


def ppo_clip_loss(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, clip: float = 0.2) -> Tensor:
    """PPO's clipped surrogate (Schulman et al., 2017), negated to be minimised.

    ``-mean(min(r A, clip(r, 1 - clip, 1 + clip) A))``, ``r = exp(log_probs - old_log_probs)``. A ratio already past
    the clip in the direction the advantage pushes gets no gradient.

    Example:
        >>> import torch
        >>> log_probs = torch.log(torch.tensor([1.5, 1.0])).requires_grad_()
        >>> loss = ppo_clip_loss(log_probs, torch.zeros(2), torch.tensor([1.0, 1.0]), clip=0.2)
        >>> round(float(loss.detach()), 4)  # -(1.2 + 1.0) / 2
        -1.1
        >>> loss.backward(); log_probs.grad.tolist()  # the clipped row gets no gradient
        [0.0, -0.5]
    """
    ratio = torch.exp(log_probs.float() - old_log_probs.detach().float())
    advantages = advantages.detach().float()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * advantages
    return -torch.minimum(unclipped, clipped).mean()


def kl_penalty(logits: Tensor, reference_logits: Tensor, multi_label: bool = False) -> Tensor:
    """Mean exact ``KL(pi || pi_ref)`` over the rows; no gradient into the reference.

    Example:
        >>> import torch
        >>> float(kl_penalty(torch.zeros(2, 3), torch.zeros(2, 3)))
        0.0
    """
    return policy_kl(logits, reference_logits.detach(), multi_label).mean()


def bradley_terry_loss(preferred_scores: Tensor, rejected_scores: Tensor, weights: Tensor | None = None) -> Tensor:
    """Bradley-Terry negative log-likelihood: ``-mean(w log sigmoid(r_w - r_l))`` (a weighted mean with ``weights``).

    Example:
        >>> import torch, math
        >>> round(float(bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0]))), 6) == round(math.log(2), 6)
        True
    """
    return _weighted_mean(F.softplus(-(preferred_scores.float() - rejected_scores.float())), weights)


def preference_margin(
    policy_preferred: Tensor, policy_rejected: Tensor, reference_preferred: Tensor, reference_rejected: Tensor
) -> Tensor:
    """``h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))`` per row (reference detached)."""
    reference = reference_preferred.detach().float() - reference_rejected.detach().float()
    return policy_preferred.float() - policy_rejected.float() - reference


def dpo_loss(
    policy_preferred: Tensor,
    policy_rejected: Tensor,
    reference_preferred: Tensor,
    reference_rejected: Tensor,
    beta: float = 0.1,
    weights: Tensor | None = None,
) -> Tensor:
    """Direct Preference Optimization (Rafailov et al., 2023): ``-mean(w log sigmoid(beta h))``.

    Args:
        policy_preferred: ``(N,)`` ``log pi(y_w | x)`` of the policy.
        policy_rejected: ``(N,)`` ``log pi(y_l | x)`` of the policy.
        reference_preferred: ``(N,)`` ``log pi_ref(y_w | x)`` of the frozen reference.
        reference_rejected: ``(N,)`` ``log pi_ref(y_l | x)`` of the frozen reference.
        beta: Inverse temperature of the implicit reward ``beta * log(pi / pi_ref)``.
        weights: Optional ``(N,)`` pair weights (a weighted mean).

    Example:
        >>> import torch, math
        >>> zero = torch.zeros(1)
        >>> round(float(dpo_loss(zero, zero, zero, zero)), 6) == round(math.log(2), 6)
        True
    """
    margin = preference_margin(policy_preferred, policy_rejected, reference_preferred, reference_rejected)
    return _weighted_mean(F.softplus(-beta * margin), weights)


def ipo_loss(
    policy_preferred: Tensor,
    policy_rejected: Tensor,
    reference_preferred: Tensor,
    reference_rejected: Tensor,
    tau: float = 0.1,
    weights: Tensor | None = None,
) -> Tensor:
    """Identity Preference Optimisation (Azar et al., 2023): ``mean(w (h - 1 / (2 tau))^2)``.

    Example:
        >>> import torch
        >>> zero = torch.zeros(1)
        >>> float(ipo_loss(zero, zero, zero, zero, tau=0.5))  # (0 - 1)^2
        1.0
    """
    margin = preference_margin(policy_preferred, policy_rejected, reference_preferred, reference_rejected)
    return _weighted_mean((margin - 1.0 / (2.0 * tau)) ** 2, weights)
