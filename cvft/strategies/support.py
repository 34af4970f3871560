"""Which strategies a task can train: the strategies' capability flags against what the task provides.

A strategy declares what it needs from the task that trains it (:class:`~cvft.strategies.Strategy`'s capability
flags): calibration batches (``needs_data``), loss terms added to the task loss (``objective``), several augmented
views (``num_views``), dataset indices in the batches (``needs_indices``), and whether the backbone's feature maps
survive its set-up (``keeps_feature_maps``). A task declares what it provides in a :class:`TaskSupport`, and
:func:`check_supported` refuses, before anything is built, the first strategy that needs what the task lacks. A new
task states its :class:`TaskSupport` once; a new strategy sets its flags once; neither names the other.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cvft.errors import StrategyError
from cvft.strategies.base import Strategy

__all__ = ["TaskSupport", "check_supported"]

#: Strategies every task trains (they only choose, inject or schedule parameters), named in refusals.
PARAMETER_STRATEGIES = (
    "linear_probe, lora, loha, lokr, adapters, ssf, bitfit, freeze_layers, gradual_unfreeze, layerwise_lr ..."
)


@dataclass(frozen=True)
class TaskSupport:
    """What a task provides the strategies it trains.

    Args:
        task: The task's name, for messages (``"ObjectDetector"``).
        calibration: Runs :meth:`~cvft.strategies.Strategy.calibrate` on training batches before the fit.
        loss_terms: Adds the strategies' loss terms to its loss (objectives: distillation, contrastive, EWC ...).
        views: Trains on several augmented views of each image.
        indices: Its training batches can carry dataset indices.
        reads_feature_maps: Reads the backbone's ``forward_intermediates`` (multi-scale feature maps).
        own_steps: Lets an objective take its own optimisation steps on each batch (PPO, TRPO).
        pair_targets: Trains on preference-pair targets without a supervised loss (DPO, reward models).

    Example:
        >>> from cvft.strategies import build_strategy
        >>> TaskSupport("ObjectDetector", reads_feature_maps=True).missing(build_strategy("supcon"))
        ['adds loss terms', 'needs several views (2)']
    """

    task: str
    calibration: bool = False
    loss_terms: bool = False
    views: bool = False
    indices: bool = False
    reads_feature_maps: bool = False
    own_steps: bool = False
    pair_targets: bool = False

    @property
    def parameter_strategies_only(self) -> bool:
        """Whether the task trains nothing but parameter strategies (no calibration, loss terms or views)."""
        return not (self.calibration or self.loss_terms or self.views)

    def missing(self, strategy: Strategy) -> list[str]:
        """What ``strategy`` needs and the task does not provide, in words (empty: the task can train it)."""
        needs = {
            "calibrates on data": strategy.needs_data and not self.calibration,
            "adds loss terms": strategy.objective and not self.loss_terms,
            f"needs several views ({strategy.num_views})": strategy.num_views > 1 and not self.views,
            "needs dataset indices": strategy.needs_indices and not self.indices,
            "takes its own optimisation steps": strategy.steps_itself and not self.own_steps,
            "trains on preference pairs": strategy.pair_targets and not self.pair_targets,
        }
        return [need for need, lacking in needs.items() if lacking]


def check_supported(strategies: Iterable[Strategy], task: TaskSupport) -> None:
    """Refuse the first strategy ``task`` cannot train, saying what it needs and what to do instead.

    Args:
        strategies: The strategies (a :class:`~cvft.strategies.StrategyStack` or a list), before their set-up.
        task: What the task provides.

    Raises:
        StrategyError: A strategy needs something the task does not provide, or breaks the feature maps it reads.

    Example:
        >>> from cvft.strategies import build_strategies
        >>> detection = TaskSupport("ObjectDetector", reads_feature_maps=True)
        >>> check_supported(build_strategies(["lora", "gradual_unfreeze"]), detection)
        >>> check_supported(build_strategies(["vpt"]), detection)
        Traceback (most recent call last):
        ...
        cvft.errors.StrategyError: Strategy 'vpt' changes the backbone's block outputs, which breaks forward_intermediates, the feature maps ObjectDetector reads; use lora or vit_adapter instead.
    """  # noqa: E501
    for strategy in strategies:
        missing = task.missing(strategy)
        if missing:
            offer = (
                f"{task.task} supports parameter strategies only ({PARAMETER_STRATEGIES})"
                if task.parameter_strategies_only
                else f"{task.task} does not provide that"
            )
            raise StrategyError(
                f"Strategy {strategy.name!r} {_join(missing)}, which assume a single-task classifier; {offer}. "
                "Use ImageClassifier for it, or leave it out."
            )
        if task.reads_feature_maps and not strategy.keeps_feature_maps:
            raise StrategyError(
                f"Strategy {strategy.name!r} changes the backbone's block outputs, which breaks forward_intermediates, "
                f"the feature maps {task.task} reads; use lora or vit_adapter instead."
            )


def _join(phrases: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return phrases[0] if len(phrases) == 1 else f"{', '.join(phrases[:-1])} and {phrases[-1]}"
