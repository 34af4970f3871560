"""Reward and preference fine-tuning of classifiers: REINFORCE, PPO, TRPO, DPO / IPO and Bradley-Terry reward models.

The classifier is a policy over labels (:mod:`~cvft.strategies.preference.policy`); a frozen reference policy
(:mod:`~cvft.strategies.preference.reference`) anchors the KL penalty and DPO; rewards come from a cost matrix, a
callable or a reward model (:mod:`~cvft.strategies.preference.rewards`). ``reinforce``, ``dpo`` and ``reward_model``
add loss terms; ``ppo`` and ``trpo`` take their own optimisation steps on each batch
(:attr:`~cvft.strategies.Strategy.steps_itself`), which :class:`~cvft.tasks.ImageClassifier` runs under Lightning's
manual optimisation.

Example:
    >>> from cvft.strategies import available_strategies
    >>> {"reinforce", "ppo", "trpo", "dpo", "reward_model"} <= set(available_strategies())
    True
"""

from cvft.strategies.preference.dpo import DPO
from cvft.strategies.preference.losses import (
    bradley_terry_loss,
    dpo_loss,
    ipo_loss,
    kl_penalty,
    normalize_advantages,
    ppo_clip_loss,
    reinforce_loss,
)
from cvft.strategies.preference.policy import action_log_probs, policy_entropy, policy_kl, sample_actions
from cvft.strategies.preference.ppo import PPO, adapt_kl_coef, ppo_update
from cvft.strategies.preference.reference import ReferencePolicy
from cvft.strategies.preference.reinforce import Reinforce
from cvft.strategies.preference.reward_model import RewardModel
from cvft.strategies.preference.rewards import CostMatrixReward, ModelReward, bayes_decisions, build_reward
from cvft.strategies.preference.rollout import Rollout, collect_rollout
from cvft.strategies.preference.trpo import TRPO, conjugate_gradient, trpo_step

__all__ = [
    "DPO",
    "PPO",
    "TRPO",
    "Reinforce",
    "RewardModel",
    "ReferencePolicy",
    "CostMatrixReward",
    "ModelReward",
    "build_reward",
    "bayes_decisions",
    "Rollout",
    "collect_rollout",
    "ppo_update",
    "adapt_kl_coef",
    "trpo_step",
    "conjugate_gradient",
    "action_log_probs",
    "sample_actions",
    "policy_entropy",
    "policy_kl",
    "reinforce_loss",
    "ppo_clip_loss",
    "kl_penalty",
    "bradley_terry_loss",
    "dpo_loss",
    "ipo_loss",
    "normalize_advantages",
]
