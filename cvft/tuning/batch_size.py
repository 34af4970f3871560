"""The batch-size finder (Lightning's ``BatchSizeFinder``): the largest batch that trains without running out of memory.

:func:`find_batch_size` runs Lightning's finder the way ``Tuner(trainer).scale_batch_size`` does, in a fit it ends
early. It sets the DataModule's ``batch_size`` (every cvft DataModule has one) to ``init_val`` and trains
``steps_per_trial`` steps; ``"power"`` doubles the batch after each trial that fits, ``"binsearch"`` then bisects
between the last size that fit and the first that did not (less a 5 % ``margin``). A trial fails on an out-of-memory
error (CUDA, cuDNN, or CPU allocator); any other error stops the search. Weights, strategy state and optimizer come
back from a checkpoint, and the random state from before the search, so the fit that follows is the fit a run with
that ``batch_size`` given would do.

On a GPU the search ends where memory does. On a CPU memory rarely runs out first, so the search stops at
``max_batch_size`` (and at the training set's size). Lightning stops at its cap without training at it; here the
cap is tried, and the result is never larger than the largest batch that completed an optimizer step.

Example:
    >>> BatchSizeFinderOptions().max_batch_size
    512
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BatchSizeFinder

from cvft.errors import ConfigError, CvftError
from cvft.tuning._search import hooks_removed_after, run_finder

__all__ = ["BATCH_SIZE_MODES", "BatchSizeFinderOptions", "BatchSizeResult", "find_batch_size"]

_logger = logging.getLogger(__name__)

#: The search modes of Lightning's finder.
BATCH_SIZE_MODES: tuple[str, ...] = ("power", "binsearch")


@dataclass
class BatchSizeFinderOptions:
    """How the batch-size finder searches (``--batch_size_finder.*``; Lightning's ``scale_batch_size`` arguments).

    Args:
        init_val: The first batch size tried.
        max_batch_size: The largest batch size tried (Lightning's ``max_val``): the search's end on a CPU, where
            memory rarely runs out first.
        steps_per_trial: Training steps at each batch size.
        max_trials: The most batch sizes tried.
        margin: ``binsearch`` only: the fraction taken off the size found, as headroom.

    Raises:
        ConfigError: A value out of range.
    """

    init_val: int = 2
    max_batch_size: int = 512
    steps_per_trial: int = 3
    max_trials: int = 25
    margin: float = 0.05

    def __post_init__(self) -> None:
        for name in ("init_val", "max_batch_size", "steps_per_trial", "max_trials"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"Batch-size finder: {name}={value!r} must be an integer >= 1 (--batch_size_finder.{name})."
                )
        if self.init_val > self.max_batch_size:
            raise ConfigError(
                f"Batch-size finder: init_val={self.init_val} is above max_batch_size={self.max_batch_size}; lower "
                "--batch_size_finder.init_val or raise --batch_size_finder.max_batch_size."
            )
        if not 0 <= self.margin < 1:
            raise ConfigError(
                f"Batch-size finder: margin={self.margin!r} must be in [0, 1) (--batch_size_finder.margin)."
            )


@dataclass
class BatchSizeResult:
    """What the batch-size finder found.

    Attributes:
        batch_size: The DataModule's ``batch_size`` now.
        mode: ``"power"`` or ``"binsearch"``.
        trained: The batch sizes that completed an optimizer step, in the order tried.
        note: Why the result differs from the search's (made even for Mixup/CutMix), empty when it does not.
    """

    batch_size: int
    mode: str
    trained: list[int] = field(default_factory=list)
    note: str = ""

    def summary(self) -> str:
        """One line for the command's printout.

        Example:
            >>> print(BatchSizeResult(8, "power", [2, 4, 8]).summary())
            Batch-size finder (power): trained at 2, 4, 8 -> batch size 8
        """
        tried = ", ".join(str(size) for size in dict.fromkeys(self.trained)) or "no size"
        return f"Batch-size finder ({self.mode}): trained at {tried} -> batch size {self.batch_size}" + (
            f" ({self.note})" if self.note else ""
        )


class _IsolatedBatchSizeFinder(BatchSizeFinder):
    """Lightning's finder, recording the batch sizes that completed an optimizer step."""

    def __init__(self, mode: str, options: BatchSizeFinderOptions) -> None:
        super().__init__(
            mode=mode,
            steps_per_trial=options.steps_per_trial,
            init_val=options.init_val,
            max_trials=options.max_trials,
            margin=options.margin,
            max_val=options.max_batch_size + 1,  # Lightning stops *at* max_val untried; so max_batch_size is tried
        )
        self.trained: list[int] = []

    def scale_batch_size(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning's search, recording the DataModule's ``batch_size`` at every optimizer step."""
        datamodule = trainer.datamodule

        def record(optimizer: Any, args: Any, kwargs: Any) -> None:
            self.trained.append(int(datamodule.batch_size))

        handles = [optimizer.register_step_post_hook(record) for optimizer in trainer.optimizers]
        with hooks_removed_after(handles):
            super().scale_batch_size(trainer, pl_module)


def find_batch_size(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    mode: Literal["power", "binsearch"] = "power",
    options: BatchSizeFinderOptions | None = None,
    hidden_callbacks: Sequence[type] = (),
) -> BatchSizeResult:
    """Find the largest batch size that trains and set it on ``datamodule`` (module docstring).

    Args:
        trainer: The Trainer of the fit to come (one device).
        model: The task; it leaves with the weights and state it came with.
        datamodule: A DataModule with a ``batch_size`` attribute (every cvft DataModule).
        mode: ``"power"`` or ``"binsearch"``.
        options: How to search; ``None``: :class:`BatchSizeFinderOptions` defaults.
        hidden_callbacks: Callback classes kept out of the finder's fit (the CLI's ``SaveConfigCallback``).

    Returns:
        The batch size set, and the sizes that trained.

    Raises:
        CvftError: Several devices (Lightning's finder runs on one), a DataModule without ``batch_size``, or no
            batch size that trains (even ``init_val`` ran out of memory).
    """
    options = options or BatchSizeFinderOptions()
    if mode not in BATCH_SIZE_MODES:
        raise ConfigError(f"Unknown batch-size search {mode!r}; choose one of {', '.join(BATCH_SIZE_MODES)}.")
    if trainer.num_devices * trainer.num_nodes > 1:
        raise CvftError(
            "The batch-size finder runs on one device (Lightning's BatchSizeFinder does not support distributed "
            "training). Find the size with --trainer.devices 1, then pass it as --data.batch_size."
        )
    if not isinstance(getattr(datamodule, "batch_size", None), int):
        raise CvftError(
            f"The batch-size finder sets the DataModule's batch_size, and {type(datamodule).__name__} has none."
        )
    finder = _IsolatedBatchSizeFinder(mode, options)
    run_finder(trainer, model, datamodule, finder, hidden_callbacks)
    found = int(finder.optimal_batch_size or datamodule.batch_size)
    if not finder.trained:
        raise CvftError(
            f"The batch-size finder could not train even a batch of {options.init_val} (out of memory). Lower "
            "--batch_size_finder.init_val, the image size or the model, or train on a larger device."
        )
    notes = []
    found = min(found, max(finder.trained))  # the size Lightning stopped at, when it never trained
    if getattr(model, "mixer", None) is not None and found % 2 and found > 1:
        found -= 1
        notes.append("made even for Mixup/CutMix")
    datamodule.batch_size = found
    if "batch_size" in getattr(datamodule, "hparams", {}):
        datamodule.hparams["batch_size"] = found
    result = BatchSizeResult(found, mode, finder.trained, "; ".join(notes))
    _logger.debug(result.summary())
    return result
