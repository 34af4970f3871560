"""Learning-rate schedules used by cvft's tasks."""

from __future__ import annotations

import math

__all__ = ["WarmupCosine"]


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
