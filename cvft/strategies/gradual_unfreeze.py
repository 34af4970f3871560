"""Gradual unfreezing (ULMFiT, Howard & Ruder 2018): start with the head, unfreeze layer groups top-down."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from cvft.backbones.layer_groups import LayerGroup, layer_groups
from cvft.errors import StrategyError
from cvft.strategies._freeze import batchnorm_parameter_names
from cvft.strategies.base import Strategy
from cvft.strategies.registry import register_strategy

__all__ = ["GradualUnfreeze"]


@register_strategy
class GradualUnfreeze(Strategy):
    """Train the head first, then unfreeze layer groups from the output side towards the stem at milestones.

    The schedule is a pure function of the epoch: at epoch ``e`` the top ``unfrozen_groups(e)`` groups below the
    head train. A run resumed from any checkpoint therefore follows exactly the schedule of an uninterrupted run.
    It acts only on parameters that were trainable when it was set up, so after LoRA it unfreezes LoRA
    weights group by group and never the frozen base weights.

    Args:
        milestones: Epochs (0-based, increasing) at which more groups unfreeze.
        groups_per_milestone: Groups unfrozen at each milestone. ``None`` spreads all groups evenly over the
            milestones, so the whole network trains from the last milestone on.
        coarse: Use timm's coarse groups (whole stages) instead of single blocks.
        train_bn: Keep BatchNorm layers of frozen groups training (affine parameters and statistics); implies
            ``bn="train"``. The statistics alone follow the ``bn`` option (:mod:`cvft.strategies.base`).

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit", num_classes=3)
        >>> schedule = GradualUnfreeze(milestones=[1, 2])
        >>> schedule.setup(model)
        >>> sum(p.requires_grad for p in model.parameters())
        2
        >>> len(schedule.on_epoch_start(model, 1)) > 0
        True
    """

    name = "gradual_unfreeze"
    unfreezes_during_fit = True
    takes_bn = True  # no default of its own: it follows the stack (else "frozen")

    def __init__(
        self,
        milestones: Sequence[int] = (1, 2, 3),
        groups_per_milestone: int | None = None,
        coarse: bool = False,
        train_bn: bool = False,
    ) -> None:
        milestones = [int(m) for m in milestones]
        if not milestones or any(m < 0 for m in milestones) or milestones != sorted(set(milestones)):
            raise StrategyError(
                f"gradual_unfreeze: milestones must be distinct increasing epochs >= 0, got {milestones}."
            )
        if groups_per_milestone is not None and groups_per_milestone < 1:
            raise StrategyError(f"gradual_unfreeze: groups_per_milestone must be >= 1, got {groups_per_milestone}.")
        self.milestones = milestones
        self.groups_per_milestone = groups_per_milestone
        self.coarse = coarse
        self.train_bn = train_bn
        self._candidates: set[str] | None = None
        self._groups: list[LayerGroup] = []

    def setup(self, model: nn.Module) -> None:
        """Remember the trainable set, then freeze everything but the head (and groups due at epoch 0)."""
        self._candidates = {n for n, p in model.named_parameters() if p.requires_grad}
        self._groups = layer_groups(model, coarse=self.coarse)
        self._apply(model, epoch=0)

    def unfrozen_groups(self, epoch: int) -> int:
        """How many groups below the head train at ``epoch``."""
        body = sum(not g.is_head for g in self._groups)
        reached = sum(m <= epoch for m in self.milestones)
        if self.groups_per_milestone is None:
            return math.ceil(body * reached / len(self.milestones))
        return min(body, reached * self.groups_per_milestone)

    def trainable_names(self, epoch: int, model: nn.Module) -> set[str]:
        """The parameters that train at ``epoch``."""
        if self._candidates is None:
            raise StrategyError("gradual_unfreeze: call setup(model) before asking for the schedule.")
        body = [g for g in self._groups if not g.is_head]
        count = self.unfrozen_groups(epoch)
        open_groups = [g for g in self._groups if g.is_head] + (body[len(body) - count :] if count else [])
        names = {n for g in open_groups for n in g.parameter_names}
        if self.train_bn:
            names |= batchnorm_parameter_names(model)
        return names & self._candidates

    def on_epoch_start(self, model: nn.Module, epoch: int) -> list[str]:
        """Unfreeze the groups due at ``epoch``; return the parameters that became trainable."""
        return self._apply(model, epoch)

    def _apply(self, model: nn.Module, epoch: int) -> list[str]:
        wanted = self.trainable_names(epoch, model)
        grouped = {n for g in self._groups for n in g.parameter_names}
        newly: list[str] = []
        for name, param in model.named_parameters():
            if name not in grouped:  # added after setup (by a later strategy): not ours to freeze or unfreeze
                continue
            train = name in wanted
            if train and not param.requires_grad:
                newly.append(name)
            param.requires_grad_(train)
        self.apply_bn_policy(model, only=self._candidates)
        return newly

    def config(self) -> dict:
        """Constructor arguments."""
        return {
            "milestones": self.milestones,
            "groups_per_milestone": self.groups_per_milestone,
            "coarse": self.coarse,
            "train_bn": self.train_bn,
            **({"bn": vars(self)["bn"]} if "bn" in vars(self) else {}),
        }
