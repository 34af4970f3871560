"""Command lines for in-process ``cvft`` runs on the tiny shapes folder of ``conftest.py``, and other tiny inputs."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset


def cvft_args(
    command: str, shapes_folder: Path, weights: Path | str, out: Path, *extra: str, epochs: int = 1
) -> list[str]:
    """``cvft <command>`` on ``test_resnet`` with ``weights``, 32 px images, no workers, outputs under ``out``."""
    return [
        command,
        "--model.backbone=test_resnet",
        "--model.pretrained=false",
        f"--model.weights={weights}",
        "--model.lr=0.01",
        "--model.warmup_epochs=0",
        f"--data.root={shapes_folder / 'train'}",
        "--data.image_size=32",
        "--data.batch_size=8",
        "--data.num_workers=0",
        "--data.augment=none",
        f"--trainer.max_epochs={epochs}",
        "--trainer.accelerator=cpu",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={out}",
        *extra,
    ]


def tiny_medmnist(path: Path, sizes: tuple[int, int, int]) -> Path:
    """A MedMNIST-style ``.npz`` of 28 px grey images, ``sizes`` (train, val, test) of them, two classes: a bright
    square marks class 1."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in zip(("train", "val", "test"), sizes, strict=True):
        labels = np.arange(count) % 2
        images = rng.integers(0, 60, size=(count, 28, 28), dtype=np.uint8)
        images[labels == 1, 8:20, 8:20] = 220
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    np.savez(path, **arrays)
    return path


class WorseEachEpoch(pl.LightningModule):
    """A one-layer regression whose logged ``val/acc`` falls every epoch, so the best checkpoint is epoch 0."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return torch.nn.functional.mse_loss(self.layer(inputs), targets)

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", torch.tensor(1.0 - 0.1 * self.current_epoch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def regression_loader() -> DataLoader:
    """Eight random (2 -> 1) regression samples in batches of two."""
    return DataLoader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=2)
