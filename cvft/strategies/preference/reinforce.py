"""The ``reinforce`` objective: REINFORCE (Williams, 1992) with a baseline, on the classifier's policy.

For each training image an action (a label; a 0/1 row for multi-label) is sampled from the current policy, scored
by the reward, and the loss is ``-mean((r - b) log pi(a | x))`` plus ``kl_coef * KL(pi || pi_ref)`` minus
``entropy_coef * H(pi)``. The baseline ``b`` lowers the variance without biasing the gradient: an exponential moving
average of the mean reward (pooled over DDP ranks), or a learned linear value head on the (detached) pooled features
trained by squared error alongside (``model.cvft_aux.reinforce_baseline``, dropped at export). One loss term per batch,
so it trains through the task's ordinary (automatic) optimisation and can keep part of the supervised loss
(``sft_weight``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvft.errors import StrategyError
from cvft.strategies._modules import feature_width
from cvft.strategies.aux import add_aux_module, get_aux_module
from cvft.strategies.outputs import StepOutputs
from cvft.strategies.preference._distributed import mean_across_ranks
from cvft.strategies.preference.losses import kl_penalty, reinforce_loss
from cvft.strategies.preference.objective import PolicyObjective, ReferenceSpec, RewardSpec
from cvft.strategies.preference.policy import action_log_probs, is_multi_label, policy_entropy, sample_actions
from cvft.strategies.registry import register_strategy

__all__ = ["Reinforce", "BASELINE_NAME"]

#: Name of the learned baseline (value head) under ``model.cvft_aux``.
BASELINE_NAME = "reinforce_baseline"
BASELINES = ("moving_average", "learned", "none")


@register_strategy
class Reinforce(PolicyObjective):
    """REINFORCE with a baseline on the classifier's policy (see the module docstring).

    Compared with supervised fine-tuning (cross-entropy on the labels), the model maximises the expected reward of
    the labels it chooses: with a cost matrix, it learns the decision the costs favour rather than the most probable
    class. Start it from an SFT checkpoint (``weights`` / ``adapter``): sampling from an untrained policy learns slowly.

    Args:
        reward: See :class:`~cvft.strategies.preference.objective.PolicyObjective`.
        baseline: ``"moving_average"`` (of the mean reward), ``"learned"`` (a linear value head on the features) or
            ``"none"``.
        baseline_momentum: Momentum of the moving average, in ``[0, 1)``.
        kl_coef: Weight of ``KL(pi || pi_ref)``.
        entropy_coef: Weight of the entropy bonus.
        sft_weight: Weight of the supervised loss kept alongside (0: reward only).
        reference: The reference policy (``None``: the model as the fit starts).
        reference_weights: Base weights of a named ``reference``.

    Example:
        >>> import torch
        >>> from cvft.strategies.outputs import StepOutputs
        >>> strategy = Reinforce(reward={"cost_matrix": [[0, 1], [1, 0]]}, baseline="none")
        >>> model = torch.nn.Linear(3, 2)
        >>> images = torch.randn(4, 3)
        >>> terms = strategy.loss_terms(model, None, StepOutputs(model(images), images, torch.tensor([0, 1, 0, 1])))
        >>> sorted(terms)
        ['policy']
    """

    name = "reinforce"

    def __init__(
        self,
        reward: RewardSpec = None,
        baseline: Literal["moving_average", "learned", "none"] = "moving_average",
        baseline_momentum: float = 0.9,
        kl_coef: float = 0.0,
        entropy_coef: float = 0.0,
        sft_weight: float = 0.0,
        reference: ReferenceSpec = None,
        reference_weights: str | None = None,
    ) -> None:
        super().__init__(reward, kl_coef, reference, reference_weights)
        if baseline not in BASELINES:
            raise StrategyError(f"reinforce: unknown baseline {baseline!r}; choose one of {', '.join(BASELINES)}.")
        if not 0.0 <= baseline_momentum < 1.0:
            raise StrategyError(f"reinforce: baseline_momentum must be in [0, 1), got {baseline_momentum}.")
        if not entropy_coef >= 0:
            raise StrategyError(f"reinforce: entropy_coef must be >= 0, got {entropy_coef}.")
        if not sft_weight >= 0:
            raise StrategyError(f"reinforce: sft_weight must be >= 0 (0: reward only), got {sft_weight}.")
        self.baseline = baseline
        self.baseline_momentum = float(baseline_momentum)
        self.entropy_coef = float(entropy_coef)
        self.sft_weight = float(sft_weight)
        self._average: Tensor | None = None

    @property
    def task_loss_weight(self) -> float:  # type: ignore[override]
        """``sft_weight``: the supervised loss's share."""
        return self.sft_weight

    @property
    def needs_features(self) -> bool:  # type: ignore[override]
        """Whether the learned baseline needs the pooled features."""
        return self.baseline == "learned"

    def setup(self, model: nn.Module) -> None:
        """With ``baseline="learned"``, attach the value head (it always trains)."""
        if self.baseline == "learned":
            width = feature_width(model, needed_by="reinforce's learned baseline", fix="Use baseline=moving_average.")
            add_aux_module(model, BASELINE_NAME, nn.Linear(width, 1)).requires_grad_(True)

    def loss_terms(self, model: nn.Module, batch: Any, outputs: StepOutputs) -> dict[str, Tensor]:
        """``policy`` (REINFORCE), and ``kl``, ``entropy``, ``baseline`` when switched on."""
        logits, targets = outputs.logits, outputs.targets
        multi_label = is_multi_label(targets)
        actions = sample_actions(logits, multi_label)
        indices = outputs.indices
        if indices is not None and outputs.num_views > 1:
            indices = indices.repeat(outputs.num_views)
        rewards = self.reward_fn(outputs.images, actions, targets, indices).detach().float().reshape(-1)
        terms: dict[str, Tensor] = {}
        baseline: Tensor | float = 0.0
        if self.baseline == "moving_average":
            batch_mean = mean_across_ranks(rewards.mean())
            if self._average is None:
                self._average = batch_mean
            baseline = self._average.to(rewards.device)
            self._average = self.baseline_momentum * baseline + (1 - self.baseline_momentum) * batch_mean
        elif self.baseline == "learned":
            head = get_aux_module(model, BASELINE_NAME)
            if head is None or outputs.features is None:
                raise StrategyError(
                    "reinforce's learned baseline needs its value head and the pooled features: set the strategy up "
                    "on the model and train through ImageClassifier or StrategyCallback."
                )
            values = head(outputs.features.detach().float()).squeeze(-1)
            terms["baseline"] = F.mse_loss(values, rewards)
            baseline = values.detach()
        log_probs = action_log_probs(logits, actions, multi_label)
        terms["policy"] = reinforce_loss(log_probs, rewards - baseline)
        if self.kl_coef > 0:
            reference = self.reference_policy.logits(model, outputs.images)
            terms["kl"] = self.kl_coef * kl_penalty(logits, reference, multi_label)
        if self.entropy_coef > 0:
            terms["entropy"] = -self.entropy_coef * policy_entropy(logits, multi_label).mean()
        return terms

    def state_dict(self) -> dict[str, Any]:
        """The reference snapshot and the moving-average baseline."""
        state = super().state_dict()
        if self._average is not None:
            state["average_reward"] = self._average.detach().cpu()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        if "average_reward" in state:
            self._average = torch.as_tensor(state["average_reward"]).clone()
