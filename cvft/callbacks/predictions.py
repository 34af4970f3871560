"""Writing predictions as a CSV of file, class name and probability."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from cvft.atomic import atomic_path
from cvft.callbacks.report import output_dir

__all__ = ["PredictionWriter"]


class PredictionWriter(BasePredictionWriter):
    """Write ``predictions.csv`` after ``trainer.predict``: one row per image.

    Columns: ``file``, ``class_name`` (for multi-label, every class above ``threshold`` joined by ``|``),
    ``probability`` (of the top class, or of each listed class) and one ``p_<class>`` column per class. File paths
    come from the data module's ``predict_files``; class names from the module's ``class_names``. The file is
    written atomically. Under DDP each rank writes ``predictions.rank<k>.csv``.

    Args:
        output: CSV path; by default ``predictions.csv`` in the run folder.
        threshold: Multi-label decision threshold.
    """

    def __init__(self, output: str | None = None, threshold: float = 0.5) -> None:
        super().__init__(write_interval="epoch")
        self.output = output
        self.threshold = threshold
        self.path: Path | None = None

    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any] | None,
    ) -> None:
        """Gather the probabilities and write the CSV."""
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        if not batches:
            return
        probs = torch.cat([b["probs"].float().cpu() for b in batches])
        index = torch.cat([b["index"].cpu() for b in batches]).tolist()
        names = list(getattr(pl_module, "class_names", [str(i) for i in range(probs.shape[1])]))
        files = list(getattr(trainer.datamodule, "predict_files", []) or [])
        multi_label = bool(getattr(pl_module, "multi_label", False))

        path = Path(self.output) if self.output else output_dir(trainer) / "predictions.csv"
        if trainer.world_size > 1:
            path = path.with_suffix(f".rank{trainer.global_rank}.csv")
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as partial, open(partial, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", "class_name", "probability", *(f"p_{n}" for n in names)])
            for i, row in zip(index, probs.tolist(), strict=True):
                file = str(files[i]) if i < len(files) else str(i)
                if multi_label:
                    chosen = [j for j, p in enumerate(row) if p >= self.threshold]
                    label = "|".join(names[j] for j in chosen)
                    probability = "|".join(f"{row[j]:.6f}" for j in chosen)
                else:
                    best = max(range(len(row)), key=row.__getitem__)
                    label, probability = names[best], f"{row[best]:.6f}"
                writer.writerow([file, label, probability, *(f"{p:.6f}" for p in row)])
        self.path = path
