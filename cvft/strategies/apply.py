"""Strategies on a bare ``nn.Module``, for hand-written training loops."""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn.functional as F
from torch import Tensor, nn

from cvft.errors import StrategyError
from cvft.strategies.base import LossFn, StrategyStack
from cvft.strategies.registry import StrategySpec, build_strategies

__all__ = ["apply_strategies"]


def apply_strategies(
    model: nn.Module,
    strategies: StrategySpec | Iterable[StrategySpec],
    calibration_data: Iterable[tuple[Tensor, Tensor]] | None = None,
    loss_fn: LossFn | None = None,
) -> StrategyStack:
    """Set up ``strategies`` on ``model`` (and calibrate those that need data) and return the stack.

    In the loop, build the optimizer from :func:`cvft.strategies.build_param_groups` (it honours the stack's
    learning-rate scales and already holds parameters that unfreeze later), call
    ``stack.on_epoch_start(model, epoch)`` at every epoch and add ``stack.loss_terms(model, batch, logits)`` to the
    loss.

    Args:
        model: A timm model (or any module with ``get_classifier()`` for strategies that need a head).
        strategies: Names, ``{"name": ..., **kwargs}`` mappings or :class:`~cvft.strategies.Strategy` instances.
        calibration_data: ``(images, targets)`` batches, e.g. the training DataLoader, for strategies that choose
            from data (``sparse`` with ``criterion="gradient"``); they run on the model's device, in eval mode.
            Ignored when no strategy needs data.
        loss_fn: The task loss ``loss_fn(logits, targets)`` for calibration; cross-entropy by default.

    Returns:
        The :class:`~cvft.strategies.StrategyStack`, already set up (and calibrated).

    Raises:
        StrategyError: A strategy needs calibration data and none was given.

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
    if stack.needs_data and calibration_data is None:
        needy = ", ".join(repr(s) for s in stack if s.needs_data)
        raise StrategyError(
            f"{needy} chooses from data: pass training batches, e.g. "
            "apply_strategies(model, specs, calibration_data=train_loader, loss_fn=F.cross_entropy) with "
            "(images, targets) batches, or choose a data-free option (sparse: criterion='magnitude', filter_select: "
            "criterion='l1')."
        )
    stack.setup(model)
    if stack.needs_data:
        assert calibration_data is not None
        stack.calibrate(model, calibration_data, loss_fn or F.cross_entropy)
    return stack
