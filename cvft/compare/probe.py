"""A callback that measures what a comparison reports besides the metrics: throughput and trainable parameters."""

from __future__ import annotations

import statistics
import time
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch

__all__ = ["RunProbe", "batch_size_of"]


def batch_size_of(batch: Any) -> int:
    """Number of images in a training batch: ``(images, targets, ...)`` with images a tensor or a list.

    Example:
        >>> batch_size_of((torch.zeros(4, 3, 8, 8), torch.zeros(4))), batch_size_of(([torch.zeros(3, 8, 8)] * 2, []))
        (4, 2)
    """
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, dict):
        batch = next(iter(batch.values()), [])
        return batch_size_of(batch)
    if isinstance(batch, list | tuple) and batch:
        first = batch[0]
        if isinstance(first, torch.Tensor):
            return int(first.shape[0]) if first.ndim else len(batch)
        if isinstance(first, list | tuple):
            return len(first)
    return 0


class RunProbe(pl.Callback):
    """Times every training step and counts trainable parameters; ``cvft compare`` adds it to each fit.

    A step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, optimizer step;
    loading the batch is excluded, since it is the same for every strategy), with a CUDA synchronisation at both
    ends on GPU. :attr:`images_per_s` is the median over the run, leaving out the first step (warm-up) when there
    are others. Trainable parameters are counted at every epoch start and the largest count is kept, so a
    strategy that unfreezes layers over time reports what it trains at most.

    Every instance is remembered in :attr:`instances`, so the process that ran the fit can find the trainer.

    Example:
        >>> probe = RunProbe()
        >>> probe.rates = [10.0, 100.0, 120.0, 110.0]
        >>> probe.images_per_s
        110.0
    """

    #: Every probe created in this process, newest last.
    instances: ClassVar[list[RunProbe]] = []

    def __init__(self) -> None:
        self.rates: list[float] = []
        self.trainable_params = 0
        self.total_params = 0
        self.trainer: pl.Trainer | None = None
        self._started: float | None = None
        self._size = 0
        RunProbe.instances.append(self)

    @property
    def images_per_s(self) -> float:
        """Median training images per second (``nan`` before the first step)."""
        rates = self.rates[1:] if len(self.rates) > 1 else self.rates
        return float(statistics.median(rates)) if rates else float("nan")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remember the trainer."""
        self.trainer = trainer

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Count trainable and total parameters; keep the largest trainable count seen."""
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        if trainable >= self.trainable_params:
            self.trainable_params = trainable
            self.total_params = sum(p.numel() for p in pl_module.parameters())

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Start the step's clock."""
        _synchronize(pl_module)
        self._size = batch_size_of(batch)
        self._started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Stop the clock and record images per second."""
        if self._started is None or not self._size:
            return
        _synchronize(pl_module)
        elapsed = time.perf_counter() - self._started
        self._started = None
        if elapsed > 0:
            self.rates.append(self._size / elapsed)


def _synchronize(module: pl.LightningModule) -> None:
    device = getattr(module, "device", None)
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
