"""Checkpoints of a run: the best by the monitored metric, and ``last.ckpt`` always at the end of the latest epoch."""

from __future__ import annotations

import os
from pathlib import Path
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

    When ``last.ckpt`` is due at the step whose checkpoint (the new best) was just written, it becomes a hard link to
    that file instead of a second serialisation of the same state. Checkpoints are replaced by renaming a new file
    over the old one, so a later best leaves the linked ``last.ckpt`` as it was. Where hard links are impossible
    (remote paths, some file systems) the state is written again.

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

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        """Write ``filepath``, or hard-link ``last.ckpt`` to the checkpoint written at this very step."""
        source = self._last_checkpoint_saved
        same_step = self._last_global_step_saved == trainer.global_step and source and source != filepath
        if same_step and filepath == self.last_model_path and _hard_link(trainer, source, filepath):
            self._last_checkpoint_saved = filepath
            return
        super()._save_checkpoint(trainer, filepath)

    def _save_last_if_stale(self, trainer: pl.Trainer) -> None:
        # _should_skip_saving_checkpoint is True when a checkpoint (and so last.ckpt) was written at this very step,
        # and in sanity checks, fast_dev_run and outside fitting.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def _hard_link(trainer: pl.Trainer, source: str, target: str) -> bool:
    """Make local ``target`` a hard link to ``source`` on rank zero, replacing it atomically; False if impossible."""
    if "://" in f"{source}{target}":  # remote storage (s3://, gs://...): Lightning writes the file
        return False
    linked = True
    if trainer.is_global_zero:
        partial = Path(target).with_name(f".{Path(target).name}.link")
        try:
            partial.unlink(missing_ok=True)
            os.link(source, partial)
            os.replace(partial, target)
        except OSError:  # no hard links on this file system, or source and target on different devices
            partial.unlink(missing_ok=True)
            linked = False
    return bool(trainer.strategy.broadcast(linked))
