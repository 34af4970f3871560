"""Checkpoints of a run: the best by the monitored metric, and ``last.ckpt`` always at the end of the latest epoch."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from cvft.errors import ConfigError

__all__ = ["RunCheckpoint"]


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` always holds the most recent state, not the best one.

    Lightning writes ``last.ckpt`` only when a top-k checkpoint was saved in the same check, so with a monitored
    metric ``last.ckpt`` equals the best checkpoint: a run resumed from it repeats every epoch since the best one,
    and whoever takes it as the final model gets the best-on-validation one. Here ``last.ckpt`` is rewritten at
    every check (end of each epoch, or each validation when it saves there) whether or not the metric improved, and
    additionally every ``last_every_n_train_steps`` optimizer steps for long epochs.

    Args:
        last_every_n_train_steps: Also rewrite ``last.ckpt`` every this many training steps (``None``: only at the
            checks). Needs ``save_last``.
        **kwargs: :class:`~lightning.pytorch.callbacks.ModelCheckpoint`'s arguments.

    Example:
        >>> RunCheckpoint(monitor="val/acc", mode="max", filename="best", save_last=True).save_last
        True
    """

    def __init__(self, *args: Any, last_every_n_train_steps: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if last_every_n_train_steps is not None and last_every_n_train_steps < 1:
            raise ConfigError(
                f"last_every_n_train_steps must be >= 1 or None, got {last_every_n_train_steps} "
                "(on the command line: --checkpoint.last_every_n_train_steps)."
            )
        self.last_every_n_train_steps = last_every_n_train_steps

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        """Lightning's step-wise saving, then ``last.ckpt`` every ``last_every_n_train_steps`` steps."""
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        every = self.last_every_n_train_steps
        if every and trainer.global_step % every == 0:
            self._save_last_if_stale(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning's epoch-end saving, then ``last.ckpt`` if that check did not write it."""
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_stale(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning's validation-end saving, then ``last.ckpt`` if that check did not write it."""
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_stale(trainer)

    def _save_last_if_stale(self, trainer: pl.Trainer) -> None:
        # _should_skip_saving_checkpoint is True when a checkpoint (and so last.ckpt) was written at this very step,
        # and in sanity checks, fast_dev_run and outside fitting.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
