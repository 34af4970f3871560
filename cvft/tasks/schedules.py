"""Learning-rate schedules and the optimizer set-up shared by cvft's tasks."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from cvft.errors import CvftError

__all__ = ["OPTIMIZERS", "WarmupCosine", "check_optimizer", "optimizer_with_schedule", "timm_kwargs"]

#: Optimizer names the tasks take.
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")


class WarmupCosine:
    """Multiplier for ``torch.optim.lr_scheduler.LambdaLR``: linear warmup, then cosine decay.

    Args:
        warmup_steps: Steps of linear warmup from ``1 / (warmup_steps + 1)`` up to 1.
        total_steps: Steps of the whole run; the cosine reaches ``min_ratio`` there.
        min_ratio: Final multiplier.

    Example:
        >>> schedule = WarmupCosine(warmup_steps=2, total_steps=10)
        >>> [round(schedule(step), 3) for step in (0, 1, 2, 6, 10)]
        [0.333, 0.667, 1.0, 0.5, 0.0]
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> None:
        if total_steps < 1 or warmup_steps < 0:
            raise ValueError(
                f"WarmupCosine needs total_steps >= 1 and warmup_steps >= 0, got {total_steps}, {warmup_steps}."
            )
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        """Multiplier of the base learning rate at optimizer step ``step``."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_optimizer(name: str) -> None:
    """Refuse an optimizer name the tasks do not build.

    Raises:
        CvftError: ``name`` is not one of :data:`OPTIMIZERS`.

    Example:
        >>> check_optimizer("sgd")
        >>> check_optimizer("lamb")
        Traceback (most recent call last):
        ...
        cvft.errors.CvftError: Unknown optimizer 'lamb'; choose 'adamw' or 'sgd'.
    """
    if name not in OPTIMIZERS:
        raise CvftError(f"Unknown optimizer {name!r}; choose 'adamw' or 'sgd'.")


def optimizer_with_schedule(groups: list[dict[str, Any]], trainer: Any, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """AdamW or SGD over ``groups`` plus a per-step warmup + cosine schedule, as ``configure_optimizers`` returns.

    ``hparams`` holds ``optimizer`` (``"adamw"`` or ``"sgd"``), ``lr``, ``weight_decay``, ``momentum``,
    ``warmup_epochs`` and ``min_lr_ratio``; the number of steps comes from ``trainer.estimated_stepping_batches``.

    Raises:
        CvftError: An unknown optimizer name.
    """
    name = hparams["optimizer"]
    check_optimizer(name)
    lr, weight_decay, momentum = hparams["lr"], hparams["weight_decay"], hparams["momentum"]
    if name == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    else:
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    total = max(1, int(trainer.estimated_stepping_batches))
    epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
    warmup = int(round(hparams["warmup_epochs"] * total / epochs))
    schedule = WarmupCosine(min(warmup, total - 1), total, hparams["min_lr_ratio"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def timm_kwargs(
    backbone_kwargs: Mapping[str, Any] | None, drop_path_rate: float | None, drop_rate: float | None = None
) -> dict[str, Any]:
    """``timm.create_model`` keyword arguments of a task: ``backbone_kwargs`` plus the rates that are set.

    Args:
        backbone_kwargs: The task's extra ``timm.create_model`` arguments.
        drop_path_rate: timm's ``drop_path_rate`` (stochastic depth); ``None`` keeps the model's default.
        drop_rate: timm's ``drop_rate`` (dropout before the classifier); ``None`` keeps the model's default.

    Example:
        >>> timm_kwargs({"img_size": 32}, 0.1)
        {'img_size': 32, 'drop_path_rate': 0.1}
        >>> timm_kwargs(None, None, drop_rate=0.2)
        {'drop_rate': 0.2}
    """
    kwargs = dict(backbone_kwargs or {})
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if drop_rate is not None:
        kwargs["drop_rate"] = drop_rate
    return kwargs
