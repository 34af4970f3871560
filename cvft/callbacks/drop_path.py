"""A schedule of stochastic depth over training: every timm ``DropPath``'s rate times a factor of the optimizer step.

timm already scales drop path with depth (block ``i`` of ``n`` drops with ``drop_path_rate * i / (n - 1)``, or a
per-stage rule). :class:`DropPathSchedule` keeps those per-block rates and multiplies them all by one factor
(:func:`drop_path_factor`) of the optimizer step ``s`` (``trainer.global_step``) out of the run's ``S``
(``trainer.estimated_stepping_batches``, which counts gradient accumulation):

* ``"constant"``: ``1`` (timm's behaviour; no callback is needed);
* ``"linear"``: ``min(1, s / S)``, from 0 up to the configured rates at the end of the run (scheduled drop path,
  Zoph et al. 2018, NASNet);
* ``"early"``: ``1`` for the first ``drop_path_epochs`` epochs (fractions allowed, converted to steps as
  ``warmup_epochs`` is), then ``0`` (early dropout, Liu et al. 2023, "Dropout Reduces Underfitting").

The factor is a function of the global step only, so a resumed fit sets the same rates as the uninterrupted one.
Every micro-batch of one accumulated step uses the same rate. ``DropPath`` acts in training mode only, so
validation, test and prediction are unaffected; modules a strategy holds in eval mode (``classifier_only``) stay
inactive whatever their rate. Drop path in frozen blocks (``linear_probe``, ``lora``) does act: it randomises what the
trained tensors see, which is the regularisation asked for. When the fit ends (or fails) the configured rates are
put back.

Example:
    >>> [drop_path_factor("linear", step, total_steps=4) for step in range(6)]
    [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    >>> [drop_path_factor("early", step, total_steps=4, off_step=2) for step in range(4)]
    [1.0, 1.0, 0.0, 0.0]
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from timm.layers import DropPath
from torch import nn

from cvft.errors import ConfigError

__all__ = [
    "DROP_PATH_SCHEDULES",
    "DropPathSchedule",
    "check_drop_path_schedule",
    "drop_path_factor",
    "drop_path_rates",
]

#: The schedules of :func:`drop_path_factor`.
DROP_PATH_SCHEDULES: tuple[str, ...] = ("constant", "linear", "early")


def drop_path_rates(model: nn.Module) -> dict[str, float]:
    """The ``drop_prob`` of every timm ``DropPath`` module of ``model``, by module name.

    Example:
        >>> import timm
        >>> rates = drop_path_rates(timm.create_model("test_resnet", drop_path_rate=0.3))
        >>> {name: round(rate, 2) for name, rate in rates.items()}
        {'layer2.0.drop_path': 0.1, 'layer3.0.drop_path': 0.2, 'layer4.0.drop_path': 0.3}
    """
    return {name: float(module.drop_prob) for name, module in model.named_modules() if isinstance(module, DropPath)}


def drop_path_factor(schedule: str, step: int, total_steps: int, off_step: int | None = None) -> float:
    """The multiplier of every configured drop-path rate at optimizer step ``step`` (module docstring).

    Args:
        schedule: One of :data:`DROP_PATH_SCHEDULES`.
        step: Optimizer steps taken so far (``trainer.global_step``).
        total_steps: Optimizer steps of the whole run (``trainer.estimated_stepping_batches``).
        off_step: First step without drop path (``"early"``).
    """
    if schedule == "linear":
        return min(1.0, step / max(1, total_steps))
    if schedule == "early":
        return 1.0 if off_step is None or step < off_step else 0.0
    return 1.0


def check_drop_path_schedule(model: nn.Module, schedule: str, epochs: float | None) -> None:
    """Refuse a schedule that would do nothing or is incomplete, before anything trains.

    Args:
        model: The backbone (its ``DropPath`` modules are scheduled).
        schedule: One of :data:`DROP_PATH_SCHEDULES`.
        epochs: ``drop_path_epochs``: needed by ``"early"``, refused by the others.

    Raises:
        ConfigError: An unknown schedule; ``"early"`` without ``drop_path_epochs`` or another schedule with it; a
            schedule other than ``"constant"`` on a backbone without drop path at a rate above 0.
    """
    if schedule not in DROP_PATH_SCHEDULES:
        raise ConfigError(
            f"Unknown drop_path_schedule {schedule!r}; choose one of {', '.join(DROP_PATH_SCHEDULES)} "
            "(--model.drop_path_schedule)."
        )
    if schedule == "early" and epochs is None:
        raise ConfigError(
            "drop_path_schedule='early' turns drop path off after drop_path_epochs epochs: pass drop_path_epochs "
            "(--model.drop_path_epochs 5, fractions allowed)."
        )
    if schedule != "early" and epochs is not None:
        raise ConfigError(
            f"drop_path_epochs={epochs} is used by drop_path_schedule='early' only (got {schedule!r}); leave it "
            "unset or set --model.drop_path_schedule early."
        )
    if schedule != "constant" and not any(rate > 0 for rate in drop_path_rates(model).values()):
        raise ConfigError(
            f"drop_path_schedule={schedule!r} schedules stochastic depth, but the backbone has no drop path at a rate "
            "above 0: set drop_path_rate (--model.drop_path_rate 0.1), or leave the schedule 'constant'."
        )


class DropPathSchedule(pl.Callback):
    """Set every ``DropPath`` of the module to its configured rate times :func:`drop_path_factor` before each batch.

    Args:
        schedule: ``"linear"`` or ``"early"`` (``"constant"`` leaves the rates alone).
        epochs: Epochs with drop path on (``"early"``); fractions allowed.
    """

    def __init__(self, schedule: str, epochs: float | None = None) -> None:
        if schedule not in DROP_PATH_SCHEDULES:
            raise ConfigError(
                f"Unknown drop_path_schedule {schedule!r}; choose one of {', '.join(DROP_PATH_SCHEDULES)}."
            )
        self.schedule = schedule
        self.epochs = epochs
        self._modules: dict[str, DropPath] = {}
        self._configured: dict[str, float] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Record the configured (timm) rates at the start of a fit."""
        if stage != "fit":
            return
        self._modules = {n: m for n, m in pl_module.named_modules() if isinstance(m, DropPath)}
        self._configured = {name: float(module.drop_prob) for name, module in self._modules.items()}

    def off_step(self, trainer: pl.Trainer) -> int | None:
        """The first optimizer step without drop path (``"early"``), converted from epochs as the warm-up is."""
        if self.epochs is None:
            return None
        total = max(1, int(trainer.estimated_stepping_batches))
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
        return int(round(self.epochs * total / epochs))

    def factor(self, trainer: pl.Trainer) -> float:
        """The factor of the current optimizer step."""
        total = max(1, int(trainer.estimated_stepping_batches))
        return drop_path_factor(self.schedule, trainer.global_step, total, self.off_step(trainer))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        """Set the rates of the coming optimizer step."""
        factor = self.factor(trainer)
        for name, module in self._modules.items():
            module.drop_prob = self._configured[name] * factor

    def _restore(self) -> None:
        for name, module in self._modules.items():
            module.drop_prob = self._configured[name]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Put the configured rates back after the fit."""
        if stage == "fit":
            self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Put the configured rates back when the fit fails."""
        self._restore()
