"""What the preference objectives share: a reward, a frozen reference policy and their recorded configuration.

The objectives that take their own optimisation steps on a rollout of each batch (``ppo``, ``trpo``) also share
the step's plumbing, :class:`RolloutObjective`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from cvft.errors import StrategyError
from cvft.strategies.base import Strategy
from cvft.strategies.outputs import StepBatch
from cvft.strategies.preference._distributed import mean_across_ranks
from cvft.strategies.preference.policy import is_multi_label
from cvft.strategies.preference.reference import ReferencePolicy
from cvft.strategies.preference.rewards import RewardFn, build_reward
from cvft.strategies.preference.rollout import Rollout, collect_rollout

__all__ = ["PolicyObjective", "RolloutObjective", "RewardSpec", "ReferenceSpec"]

#: A strategy's ``reward`` option: ``{"cost_matrix": [[...]]}``, ``{"model": ...}``, a callable or ``None``.
RewardSpec = Mapping[str, Any] | RewardFn | None
#: A strategy's ``reference`` option: ``None`` (snapshot of the starting model), a network, or a file / timm name.
ReferenceSpec = str | nn.Module | None


def _recorded(value: Any) -> Any:
    """``value`` as primitives for logs and checkpoints: a module or callable becomes ``"module:<class>"`` etc."""
    if isinstance(value, nn.Module):
        return f"module:{type(value).__name__}"
    if isinstance(value, Mapping):
        return {key: _recorded(item) for key, item in value.items()}
    if callable(value):
        return f"callable:{getattr(value, '__qualname__', type(value).__name__)}"
    return value


class PolicyObjective(Strategy):
    """Base of the objectives that treat the classifier as a policy (:mod:`cvft.strategies.preference.policy`).

    They replace the supervised loss (``task_loss_weight`` 0 unless a subclass says otherwise), read a reward
    (:func:`~cvft.strategies.preference.rewards.build_reward`) and keep a frozen reference policy
    (:class:`~cvft.strategies.preference.reference.ReferencePolicy`) outside the model.

    Args:
        reward: ``{"cost_matrix": [[...]]}``, ``{"model": <reward model>}``, a callable
            ``reward(images, actions, targets, indices)``, or ``None`` (1 for the right label).
        kl_coef: Weight of ``KL(pi || pi_ref)`` to the reference policy.
        reference: ``None`` (the model as the fit starts), or a reference network / file / timm name.
        reference_weights: Base weights of a timm-name or adapter ``reference``.
    """

    objective = True
    task_loss_weight: float = 0.0

    def __init__(
        self,
        reward: RewardSpec = None,
        kl_coef: float = 0.0,
        reference: ReferenceSpec = None,
        reference_weights: str | None = None,
    ) -> None:
        if not kl_coef >= 0:
            raise StrategyError(f"{self.name}: kl_coef must be >= 0 (0 turns the KL penalty off), got {kl_coef}.")
        if reward is not None and not (isinstance(reward, Mapping) or callable(reward)):
            raise StrategyError(
                f"{self.name}: reward must be {{cost_matrix: [[...]]}}, {{model: ...}} or a callable, got {reward!r}."
            )
        if isinstance(reward, Mapping) and "cost_matrix" in reward:
            build_reward(reward)  # refuse a bad matrix now
        self.reward = reward
        self.kl_coef = float(kl_coef)
        self.reference = reference
        self.reference_weights = reference_weights
        self._reward_fn: RewardFn | None = None
        self._reference = ReferencePolicy(reference, reference_weights)

    @property
    def reward_fn(self) -> RewardFn:
        """The reward function (a reward model is loaded at first use)."""
        if self._reward_fn is None:
            self._reward_fn = build_reward(self.reward)
        return self._reward_fn

    @property
    def reference_policy(self) -> ReferencePolicy:
        """The frozen reference policy."""
        return self._reference

    @property
    def current_kl_coef(self) -> float:
        """The KL coefficient in force (``kl_coef`` unless a subclass adapts it)."""
        return self.kl_coef

    def config(self) -> dict[str, Any]:
        """Constructor arguments as primitives (a callable or module is recorded by its name)."""
        return {key: _recorded(value) for key, value in super().config().items()}

    def state_dict(self) -> dict[str, Any]:
        """The reference snapshot (so that a resumed fit keeps the same reference)."""
        return {"reference": self._reference.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._reference.load_state_dict(state.get("reference", {}))


class RolloutObjective(PolicyObjective):
    """Base of the objectives that take their own optimisation steps on a rollout of each training batch.

    :meth:`optimisation_step` collects the rollout
    (:func:`~cvft.strategies.preference.rollout.collect_rollout`; with the reference policy's logits while
    :attr:`~PolicyObjective.current_kl_coef` is positive), hands it to :meth:`update` and adds the batch's mean
    reward, over DDP ranks, to the scalars that returns.

    Args:
        args: :class:`PolicyObjective`'s arguments.
        normalize_advantages: Divide the advantages by their standard deviation over the batch.
        kwargs: :class:`PolicyObjective`'s arguments.
    """

    steps_itself = True

    def __init__(self, *args: Any, normalize_advantages: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.normalize_advantages = bool(normalize_advantages)

    def update(
        self, model: nn.Module, images: Tensor, rollout: Rollout, optimizer_step: Callable[[], None]
    ) -> dict[str, Tensor]:
        """Train ``model`` on ``rollout`` (collected on ``images``); return scalars to log, by name."""
        raise NotImplementedError

    def optimisation_step(
        self, model: nn.Module, batch: StepBatch, optimizer_step: Callable[[], None]
    ) -> dict[str, Tensor]:
        """Collect a rollout on the batch's images and :meth:`update` on it; the scalars include the mean ``reward``."""
        reference = self.reference_policy if self.current_kl_coef > 0 else None
        images, targets = batch.images, batch.targets
        rollout = collect_rollout(
            model, images, targets, self.reward_fn, is_multi_label(targets), reference, batch.indices,
            self.normalize_advantages,
        )  # fmt: skip
        stats = self.update(model, images, rollout, optimizer_step)
        return {"reward": mean_across_ranks(rollout.rewards.mean()), **stats}
