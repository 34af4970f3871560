"""The Lightning hooks every cvft task needs for its strategies: DDP gradients of late-unfrozen parameters, state."""

from __future__ import annotations

from typing import Any

from cvft.strategies._ddp import LateGradientSync
from cvft.strategies.base import StrategyStack

__all__ = ["StrategyHooks"]


class StrategyHooks:
    """Mixin for a LightningModule with a ``strategy_stack``; list it before ``pl.LightningModule``.

    * ``on_fit_start`` records which parameters DDP synchronises, and ``on_after_backward`` averages across ranks the
      gradients of parameters unfrozen later (gradual unfreezing), via
      :class:`~cvft.strategies._ddp.LateGradientSync`.
    * ``on_save_checkpoint`` / ``on_load_checkpoint`` keep the strategies' own state (EWC's Fisher, sparse indices,
      caches) with the weights, under ``checkpoint["cvft_strategies"]``.

    Example:
        >>> import lightning.pytorch as pl
        >>> from cvft.strategies import StrategyStack
        >>> class Task(StrategyHooks, pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.strategy_stack = StrategyStack()
        >>> checkpoint = {}
        >>> Task().on_save_checkpoint(checkpoint)
        >>> checkpoint
        {'cvft_strategies': {}}
    """

    strategy_stack: StrategyStack

    @property
    def _grad_sync(self) -> LateGradientSync:
        sync = self.__dict__.get("_cvft_grad_sync")
        if sync is None:
            sync = self.__dict__["_cvft_grad_sync"] = LateGradientSync()
        return sync

    def on_fit_start(self) -> None:
        """Remember which parameters DDP synchronises (gradual unfreezing adds others later)."""
        self._grad_sync.capture(self)  # type: ignore[arg-type]

    def on_after_backward(self) -> None:
        """Average, across DDP ranks, gradients of parameters unfrozen after DDP wrapped the model."""
        self._grad_sync.sync(self)  # type: ignore[arg-type]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the strategies' own state with the weights."""
        checkpoint["cvft_strategies"] = self.strategy_stack.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore what :meth:`on_save_checkpoint` kept."""
        self.strategy_stack.load_state_dict(checkpoint.get("cvft_strategies", {}))
