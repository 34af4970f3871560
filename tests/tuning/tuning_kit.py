"""What the finder tests share: the tiny classifier, its data, a deterministic Trainer, and state snapshots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from quiet_trainer import make_trainer

from cvft.data import ImageFolderDataModule
from cvft.tasks import ImageClassifier


def make_data(root: Path) -> ImageFolderDataModule:
    """The ``image_root`` folder at 32 px in batches of 4 (18 training images: 5 batches an epoch)."""
    return ImageFolderDataModule(
        str(root), image_size=32, batch_size=4, num_workers=0, augment="none", val_fraction=0.25, check_images="none"
    )


def trainer_for(tmp_path: Path, epochs: int = 2) -> pl.Trainer:
    """A quiet, deterministic CPU Trainer writing under ``tmp_path``."""
    return make_trainer(epochs, deterministic=True, default_root_dir=tmp_path)


def build(lr: float | str | None, **kwargs: Any) -> ImageClassifier:
    """``test_resnet`` from scratch on 3 classes, half an epoch of warmup."""
    return ImageClassifier("test_resnet", pretrained=False, num_classes=3, lr=lr, warmup_epochs=0.5, **kwargs)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every tensor of ``model``'s state dict."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def trainable(model: torch.nn.Module) -> set[str]:
    """The names of the parameters that train."""
    return {name for name, p in model.named_parameters() if p.requires_grad}


def unchanged(before: dict[str, torch.Tensor], model: torch.nn.Module) -> bool:
    """Whether ``model`` holds exactly the tensors of ``before`` (same names, same values)."""
    after = state(model)
    return before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)


def swept_rate(step: int, steps: int) -> float:
    """The rate Lightning's exponential LR-finder schedule writes at ``step`` of ``steps`` (from 1e-8 up to 1)."""
    return 1e-8 * 1e8 ** ((step + 1) / steps) if step else 1e-8
