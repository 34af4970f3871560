"""The ``ppo`` objective: Proximal Policy Optimization (Schulman et al., 2017) for a one-step classification policy.

Each training batch becomes a rollout buffer (:func:`~cvft.strategies.preference.rollout.collect_rollout`): actions
sampled from the current policy, their rewards, advantages normalised over the buffer (a bandit: no value function or
GAE). Then ``epochs`` passes over the buffer, in ``minibatches`` shuffled pieces each, minimise

    -mean(min(r A, clip(r, 1 - clip, 1 + clip) A)) + kl_coef * KL(pi || pi_ref) - entropy_coef * H(pi)

with the task's optimizer, one optimizer step per minibatch. With ``kl_target`` the KL coefficient adapts after each
buffer as in the paper's section 4: halved when the measured ``KL(pi || pi_ref)`` is below ``kl_target / 1.5``,
doubled above ``1.5 * kl_target``.

Several optimizer steps per batch do not fit one loss term: PPO sets :attr:`~cvft.strategies.Strategy.steps_itself`,
:class:`~cvft.tasks.ImageClassifier` then uses Lightning's manual optimisation and calls
:meth:`PPO.optimisation_step` with its optimizer. Gradients are computed with ``torch.autograd.grad`` and averaged
over DDP ranks explicitly (:func:`~cvft.strategies.preference.rollout.gradient_step`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from cvft.errors import StrategyError
from cvft.strategies.base import eval_mode
from cvft.strategies.preference._distributed import mean_across_ranks
from cvft.strategies.preference.losses import kl_penalty, ppo_clip_loss
from cvft.strategies.preference.objective import ReferenceSpec, RewardSpec, RolloutObjective
from cvft.strategies.preference.policy import action_log_probs, policy_entropy
from cvft.strategies.preference.rollout import Rollout, gradient_step, trainable_parameters
from cvft.strategies.registry import register_strategy

__all__ = ["PPO", "ppo_update", "adapt_kl_coef"]


def adapt_kl_coef(kl_coef: float, measured_kl: float, kl_target: float) -> float:
    """PPO's adaptive KL coefficient: halve below ``kl_target / 1.5``, double above ``1.5 * kl_target``.

    Example:
        >>> adapt_kl_coef(0.1, 0.001, 0.01), adapt_kl_coef(0.1, 0.1, 0.01), adapt_kl_coef(0.1, 0.01, 0.01)
        (0.05, 0.2, 0.1)
    """
    if measured_kl < kl_target / 1.5:
        return kl_coef / 2
    if measured_kl > kl_target * 1.5:
        return kl_coef * 2
    return kl_coef


def ppo_update(
    model: nn.Module,
    rollout: Rollout,
    optimizer_step: Callable[[], None],
    epochs: int = 4,
    minibatches: int = 1,
    clip: float = 0.2,
    kl_coef: float = 0.0,
    entropy_coef: float = 0.0,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """PPO's inner loop: ``epochs`` passes over ``rollout`` in ``minibatches`` shuffled pieces, one step each.

    Returns the last minibatch's ``loss`` and the fraction of rows whose ratio was clipped (``clip_fraction``).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 2)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> from cvft.strategies.preference.rollout import collect_rollout
        >>> rollout = collect_rollout(model, torch.randn(8, 2), torch.zeros(8, dtype=torch.long),
        ...                           lambda x, a, t, i: (a == t).float(), multi_label=False)
        >>> stats = ppo_update(model, rollout, lambda: (optimizer.step(), optimizer.zero_grad()), epochs=2)
        >>> sorted(stats)
        ['clip_fraction', 'loss']
    """
    parameters = trainable_parameters(model)
    size = len(rollout)
    if minibatches > size:
        raise StrategyError(f"ppo: {minibatches} minibatches of a {size}-image batch; use minibatches <= batch size.")
    stats: dict[str, Tensor] = {}
    with eval_mode(model):
        for _ in range(epochs):
            order = torch.randperm(size, generator=generator).to(rollout.images.device)
            for chunk in order.chunk(minibatches):
                part = rollout.rows(chunk)
                logits = model(part.images)
                log_probs = action_log_probs(logits, part.actions, part.multi_label)
                loss = ppo_clip_loss(log_probs, part.old_log_probs, part.advantages, clip)
                if kl_coef > 0 and part.reference_logits is not None:
                    loss = loss + kl_coef * kl_penalty(logits, part.reference_logits, part.multi_label)
                if entropy_coef > 0:
                    loss = loss - entropy_coef * policy_entropy(logits, part.multi_label).mean()
                gradient_step(loss, parameters, optimizer_step)
                ratio = torch.exp(log_probs.detach() - part.old_log_probs)
                stats = {"loss": loss.detach(), "clip_fraction": ((ratio - 1).abs() > clip).float().mean()}
    return stats


@register_strategy
class PPO(RolloutObjective):
    """PPO with the clipped surrogate, a KL penalty to the reference and an entropy bonus (see the module docstring).

    Compared with supervised fine-tuning, the model maximises the expected reward of labels sampled from itself,
    kept near the starting (SFT) model by the clip and the KL penalty. It replaces the supervised loss.

    Args:
        reward: See :class:`~cvft.strategies.preference.objective.PolicyObjective`.
        clip: The clip ``epsilon`` of the probability ratio.
        epochs: Passes over each rollout buffer (a training batch).
        minibatches: Optimizer steps per pass (the buffer split in this many shuffled pieces).
        kl_coef: Initial weight of ``KL(pi || pi_ref)``.
        kl_target: Adapt ``kl_coef`` towards this KL after each buffer (``None``: a fixed coefficient).
        entropy_coef: Weight of the entropy bonus.
        normalize_advantages: Divide the advantages by their standard deviation over the buffer.
        reference: The reference policy (``None``: the model as the fit starts).
        reference_weights: Base weights of a named ``reference``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> ppo = PPO(reward={"cost_matrix": [[0, 1], [5, 0]]}, epochs=2, kl_coef=0.1)
        >>> from cvft.strategies.outputs import StepBatch
        >>> batch = StepBatch(torch.randn(8, 3), torch.tensor([0, 1] * 4))
        >>> stats = ppo.optimisation_step(model, batch, lambda: (optimizer.step(), optimizer.zero_grad()))
        >>> sorted(stats)
        ['clip_fraction', 'kl', 'kl_coef', 'loss', 'reward']
    """

    name = "ppo"

    def __init__(
        self,
        reward: RewardSpec = None,
        clip: float = 0.2,
        epochs: int = 4,
        minibatches: int = 1,
        kl_coef: float = 0.1,
        kl_target: float | None = None,
        entropy_coef: float = 0.0,
        normalize_advantages: bool = True,
        reference: ReferenceSpec = None,
        reference_weights: str | None = None,
    ) -> None:
        super().__init__(reward, kl_coef, reference, reference_weights, normalize_advantages=normalize_advantages)
        if not 0 < clip < 1:
            raise StrategyError(f"ppo: clip must be in (0, 1) (0.1-0.3 is usual), got {clip}.")
        if epochs < 1 or minibatches < 1:
            raise StrategyError(f"ppo: epochs and minibatches must be >= 1, got {epochs} and {minibatches}.")
        if kl_target is not None and not kl_target > 0:
            raise StrategyError(f"ppo: kl_target must be > 0 (or None for a fixed kl_coef), got {kl_target}.")
        if kl_target is not None and kl_coef == 0:
            raise StrategyError("ppo: an adaptive KL (kl_target) needs a starting kl_coef > 0.")
        if not entropy_coef >= 0:
            raise StrategyError(f"ppo: entropy_coef must be >= 0, got {entropy_coef}.")
        self.clip = float(clip)
        self.epochs = int(epochs)
        self.minibatches = int(minibatches)
        self.kl_target = None if kl_target is None else float(kl_target)
        self.entropy_coef = float(entropy_coef)
        self._kl_coef = self.kl_coef  # the adapted value; ``kl_coef`` keeps what was configured

    @property
    def current_kl_coef(self) -> float:
        """The KL coefficient in force (adapted with ``kl_target``)."""
        return self._kl_coef

    def update(
        self, model: nn.Module, images: Tensor, rollout: Rollout, optimizer_step: Callable[[], None]
    ) -> dict[str, Tensor]:
        """Run :func:`ppo_update` on the rollout; measure the KL to the reference and adapt its coefficient."""
        stats = ppo_update(
            model, rollout, optimizer_step, self.epochs, self.minibatches, self.clip, self._kl_coef, self.entropy_coef
        )
        if rollout.reference_logits is not None:
            with eval_mode(model), torch.no_grad():
                kl = mean_across_ranks(kl_penalty(model(images), rollout.reference_logits, rollout.multi_label))
            stats["kl"] = kl
            if self.kl_target is not None:
                self._kl_coef = adapt_kl_coef(self._kl_coef, float(kl), self.kl_target)
        stats["kl_coef"] = torch.tensor(self._kl_coef)
        return stats

    def state_dict(self) -> dict[str, Any]:
        """The reference snapshot and the adapted KL coefficient."""
        return {**super().state_dict(), "kl_coef": self._kl_coef}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self._kl_coef = float(state.get("kl_coef", self._kl_coef))
