"""Strategies on a bare ``nn.Module``, for hand-written training loops."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from cvft.strategies.base import StrategyStack
from cvft.strategies.registry import StrategySpec, build_strategies

__all__ = ["apply_strategies"]


def apply_strategies(model: nn.Module, strategies: StrategySpec | Iterable[StrategySpec]) -> StrategyStack:
    """Set up ``strategies`` on ``model`` and return the stack for the rest of the loop.

    In the loop, build the optimizer from :func:`cvft.strategies.build_param_groups` (it honours the stack's
    learning-rate scales and already holds parameters that unfreeze later), call
    ``stack.on_epoch_start(model, epoch)`` at every epoch and add ``stack.loss_terms(model, batch, logits)`` to the
    loss.

    Args:
        model: A timm model (or any module with ``get_classifier()`` for strategies that need a head).
        strategies: Names, ``{"name": ..., **kwargs}`` mappings or :class:`~cvft.strategies.Strategy` instances.

    Returns:
        The :class:`~cvft.strategies.StrategyStack`, already set up.

    Example:
        >>> import timm, torch
        >>> from cvft.strategies import build_param_groups
        >>> model = timm.create_model("test_vit", num_classes=3)
        >>> stack = apply_strategies(model, ["layerwise_lr", {"name": "gradual_unfreeze", "milestones": [1]}])
        >>> optimizer = torch.optim.AdamW(build_param_groups(model, 1e-3, 0.05, stack.lr_scales(model)))
        >>> for epoch in range(2):
        ...     unfrozen = stack.on_epoch_start(model, epoch)
        ...     loss = model(torch.randn(2, 3, 32, 32)).logsumexp(1).mean()
        ...     loss.backward(); optimizer.step(); optimizer.zero_grad()
        >>> all(p.requires_grad for p in model.parameters())
        True
    """
    stack = StrategyStack(build_strategies(strategies))
    stack.setup(model)
    return stack
