"""The base of cvft's prediction writers: one file per ``trainer.predict``, in the run folder, one per DDP rank.

Subclasses set :attr:`PredictionFileWriter.default_name` and implement :meth:`PredictionFileWriter.write`, which
receives the outputs of ``predict_step``, one per batch (of the first predict dataloader when there are several).

Example:
    >>> class CountWriter(PredictionFileWriter):
    ...     default_name = "count.txt"
    ...     def write(self, trainer, pl_module, batches):
    ...         self.path = self.output_path(trainer)
    ...         self.path.write_text(str(len(batches)))
    >>> CountWriter(output="out/count.txt").output
    'out/count.txt'
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter

from cvft.callbacks.report import output_dir

__all__ = ["PredictionFileWriter"]


class PredictionFileWriter(BasePredictionWriter):
    """Write one file from all predictions at the end of ``trainer.predict``.

    Args:
        output: File path; by default :attr:`default_name` in the run folder.

    Attributes:
        path: The file written by the last run (``None`` before).
    """

    #: File name in the run folder when ``output`` is not given; its suffix is kept for the per-rank names.
    default_name: ClassVar[str] = "predictions"

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output = output
        self.path: Path | None = None

    def output_path(self, trainer: pl.Trainer) -> Path:
        """``output`` or the run folder's :attr:`default_name`; under DDP ``<stem>.rank<k><suffix>`` per rank."""
        path = Path(self.output) if self.output else output_dir(trainer) / self.default_name
        if trainer.world_size > 1:
            path = path.with_suffix(f".rank{trainer.global_rank}{Path(self.default_name).suffix}")
        return path

    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any] | None,
    ) -> None:
        """Hand the outputs of every predict batch to :meth:`write`."""
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        self.write(trainer, pl_module, list(batches or []))

    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]) -> None:
        """Write the file (and set :attr:`path`) from the ``predict_step`` outputs ``batches``."""
        raise NotImplementedError
