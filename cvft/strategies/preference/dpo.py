"""The ``dpo`` objective: Direct Preference Optimization (Rafailov et al., 2023) and IPO (Azar et al., 2023).

Trained on preference pairs (image, preferred label ``y_w``, rejected label ``y_l``;
:mod:`cvft.data.preference`) against the frozen reference policy, with no reward model and no sampling. With
``h = (log pi(y_w | x) - log pi_ref(y_w | x)) - (log pi(y_l | x) - log pi_ref(y_l | x))`` the loss is
``-log sigmoid(beta h)`` (DPO) or ``(h - 1 / (2 tau))^2`` (IPO), averaged with the pairs' weights.

Single-label pairs name two classes (``log pi`` of the softmax); multi-label pairs name two label sets ``y``, and
``log pi(y | x) = sum_c [y_c log sigmoid(z_c) + (1 - y_c) log sigmoid(-z_c)]`` (independent Bernoulli policies,
:func:`~cvft.strategies.preference.policy.action_log_probs`). Which one a batch holds follows from its pair
targets and the number of outputs (:func:`~cvft.data.preference.split_pair_targets`).
"""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

from cvft.data.preference import split_pair_targets
from cvft.errors import StrategyError
from cvft.strategies.outputs import StepOutputs
from cvft.strategies.preference.losses import dpo_loss, ipo_loss
from cvft.strategies.preference.objective import PolicyObjective, ReferenceSpec
from cvft.strategies.preference.policy import action_log_probs, is_multi_label
from cvft.strategies.registry import register_strategy

__all__ = ["DPO"]

LOSSES = ("dpo", "ipo")


@register_strategy
class DPO(PolicyObjective):
    """DPO or IPO on preference pairs with a frozen reference (see the module docstring).

    Compared with supervised fine-tuning, the model learns from which of two labels is better for an image rather
    than from the right label, and stays near the starting (SFT) model through the reference. It replaces the
    supervised loss; the training data must be pairs.

    Args:
        beta: DPO's inverse temperature (larger: the policy may move further from the reference).
        loss: ``"dpo"`` (logistic) or ``"ipo"`` (squared, regularised towards the margin ``1 / (2 tau)``).
        tau: IPO's regularisation ``tau``.
        reference: The reference policy (``None``: the model as the fit starts).
        reference_weights: Base weights of a named ``reference``.

    Example:
        >>> import torch
        >>> from cvft.strategies.outputs import StepOutputs
        >>> model = torch.nn.Linear(3, 2)
        >>> images, pairs = torch.randn(2, 3), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
        >>> terms = DPO(beta=0.5).loss_terms(model, None, StepOutputs(model(images), images, pairs))
        >>> round(float(terms["dpo"].detach()), 4)  # the policy is the reference: log 2
        0.6931
    """

    name = "dpo"
    pair_targets = True

    def __init__(
        self,
        beta: float = 0.1,
        loss: Literal["dpo", "ipo"] = "dpo",
        tau: float = 0.1,
        reference: ReferenceSpec = None,
        reference_weights: str | None = None,
    ) -> None:
        super().__init__(None, 0.0, reference, reference_weights)
        if loss not in LOSSES:
            raise StrategyError(f"dpo: unknown loss {loss!r}; choose one of {', '.join(LOSSES)}.")
        if not beta > 0 or not tau > 0:
            raise StrategyError(f"dpo: beta and tau must be > 0, got beta={beta}, tau={tau}.")
        self.beta = float(beta)
        self.loss = loss
        self.tau = float(tau)

    def config(self) -> dict[str, Any]:
        """``beta``, ``loss``, ``tau`` and the reference (no reward: DPO needs none)."""
        config = super().config()
        for key in ("reward", "kl_coef"):
            config.pop(key, None)
        return config

    def loss_terms(self, model: nn.Module, batch: Any, outputs: StepOutputs) -> dict[str, Tensor]:
        """``{"dpo": ...}`` or ``{"ipo": ...}`` on the batch's pairs."""
        preferred, rejected, weights = split_pair_targets(outputs.targets, num_classes=outputs.logits.shape[-1])
        multi_label = is_multi_label(preferred)
        logits = outputs.logits.float()
        reference = self.reference_policy.logits(model, outputs.images).float()
        args = (
            action_log_probs(logits, preferred, multi_label),
            action_log_probs(logits, rejected, multi_label),
            action_log_probs(reference, preferred, multi_label),
            action_log_probs(reference, rejected, multi_label),
        )
        if self.loss == "ipo":
            return {"ipo": ipo_loss(*args, tau=self.tau, weights=weights)}
        return {"dpo": dpo_loss(*args, beta=self.beta, weights=weights)}
