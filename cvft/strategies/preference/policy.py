"""A classifier seen as a policy: its softmax (one sigmoid per label for multi-label) over actions, which are labels.

For an image ``x`` with logits ``z`` a single-label classifier is the categorical policy ``pi(a | x) = softmax(z)_a``
over the ``C`` classes; a multi-label classifier is ``C`` independent Bernoulli policies, and an action is a 0/1 vector
``a`` with ``log pi(a | x) = sum_c [a_c log sigmoid(z_c) + (1 - a_c) log sigmoid(-z_c)]``. These functions are the
policy's log-probabilities, samples, entropy and KL divergence, computed exactly (no Monte-Carlo) in float32.

Whether a batch is multi-label is read from its targets: ``(N,)`` class indices are single-label, ``(N, C)`` multi-hot
rows are multi-label (:func:`is_multi_label`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["is_multi_label", "action_log_probs", "sample_actions", "policy_entropy", "policy_kl"]


def is_multi_label(targets: Tensor | None) -> bool:
    """Whether ``targets`` are multi-hot rows ``(N, C)`` (multi-label) rather than class indices ``(N,)``.

    Example:
        >>> import torch
        >>> is_multi_label(torch.tensor([0, 2])), is_multi_label(torch.zeros(2, 3))
        (False, True)
    """
    return targets is not None and targets.ndim == 2


def action_log_probs(logits: Tensor, actions: Tensor, multi_label: bool = False) -> Tensor:
    """``log pi(a | x)`` of each row's action: ``(N,)``.

    Args:
        logits: ``(N, C)`` logits of the policy.
        actions: ``(N,)`` class indices, or ``(N, C)`` 0/1 rows for multi-label.
        multi_label: Independent Bernoulli policies per label instead of one categorical.

    Example:
        >>> import torch
        >>> logits = torch.log(torch.tensor([[0.25, 0.75]]))
        >>> action_log_probs(logits, torch.tensor([1])).exp()
        tensor([0.7500])
        >>> action_log_probs(torch.zeros(1, 2), torch.tensor([[1, 0]]), multi_label=True).exp()
        tensor([0.2500])
    """
    logits = logits.float()
    if multi_label:
        actions = actions.to(logits.dtype)
        return (actions * F.logsigmoid(logits) + (1 - actions) * F.logsigmoid(-logits)).sum(-1)
    return F.log_softmax(logits, dim=-1).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)


def sample_actions(logits: Tensor, multi_label: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """Actions drawn from the policy (no gradient): ``(N,)`` class indices, or ``(N, C)`` 0/1 rows for multi-label.

    Example:
        >>> import torch
        >>> sample_actions(torch.tensor([[0.0, 50.0], [50.0, 0.0]])).tolist()
        [1, 0]
    """
    with torch.no_grad():
        logits = logits.detach().float()
        if multi_label:
            uniform = torch.rand(logits.shape, generator=generator, device=logits.device)
            return (uniform < logits.sigmoid()).long()
        probs = F.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def policy_entropy(logits: Tensor, multi_label: bool = False) -> Tensor:
    """Entropy of each row's policy, in nats: ``(N,)`` (summed over labels for multi-label).

    Example:
        >>> import torch, math
        >>> round(float(policy_entropy(torch.zeros(1, 4))[0]), 4) == round(math.log(4), 4)
        True
    """
    logits = logits.float()
    if multi_label:
        p = logits.sigmoid()
        return -(p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits)).sum(-1)
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def policy_kl(logits: Tensor, other_logits: Tensor, multi_label: bool = False) -> Tensor:
    """``KL(pi || pi_other)`` per row, exactly: ``(N,)`` (summed over labels for multi-label).

    Gradients flow into both arguments; detach the one that is fixed (the reference, the old policy).

    Example:
        >>> import torch
        >>> p, q = torch.log(torch.tensor([[0.5, 0.5]])), torch.log(torch.tensor([[0.25, 0.75]]))
        >>> round(float(policy_kl(p, q)[0]), 6)  # 0.5 log(0.5/0.25) + 0.5 log(0.5/0.75)
        0.143841
    """
    logits, other_logits = logits.float(), other_logits.float()
    if multi_label:
        p = logits.sigmoid()
        log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
        log_q, log_not_q = F.logsigmoid(other_logits), F.logsigmoid(-other_logits)
        return (p * (log_p - log_q) + (1 - p) * (log_not_p - log_not_q)).sum(-1)
    log_p, log_q = F.log_softmax(logits, dim=-1), F.log_softmax(other_logits, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)
