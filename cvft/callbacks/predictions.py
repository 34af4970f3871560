"""Writing predictions as a CSV of file, class name and probability."""

from __future__ import annotations

import csv
from typing import Any

import lightning.pytorch as pl
import torch

from cvft.atomic import atomic_path
from cvft.callbacks.prediction_file import PredictionFileWriter

__all__ = ["PredictionWriter"]


class PredictionWriter(PredictionFileWriter):
    """Write ``predictions.csv`` after ``trainer.predict``: one row per image.

    Columns: ``file``, ``class_name`` (for multi-label, every class above ``threshold`` joined by ``|``),
    ``probability`` (of the top class, or of each listed class) and one ``p_<class>`` column per class. File paths
    come from the data module's ``predict_files``; class names from the module's ``class_names``. The file is
    written atomically. Under DDP each rank writes ``predictions.rank<k>.csv``.

    Args:
        output: CSV path; by default ``predictions.csv`` in the run folder.
        threshold: Multi-label decision threshold.
    """

    default_name = "predictions.csv"

    def __init__(self, output: str | None = None, threshold: float = 0.5) -> None:
        super().__init__(output)
        self.threshold = threshold

    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]) -> None:
        """Gather the probabilities and write the CSV."""
        if not batches:
            return
        probs = torch.cat([b["probs"].float().cpu() for b in batches])
        index = torch.cat([b["index"].cpu() for b in batches]).tolist()
        names = list(getattr(pl_module, "class_names", [str(i) for i in range(probs.shape[1])]))
        files = list(getattr(trainer.datamodule, "predict_files", []) or [])
        multi_label = bool(getattr(pl_module, "multi_label", False))

        path = self.output_path(trainer)
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
