"""Checkpoints of modules built with pathlib.Path arguments load with torch.load(weights_only=True)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from cvft.data import ImageFolderDataModule
from cvft.tasks import ImageClassifier


def test_path_arguments_do_not_make_checkpoints_unloadable(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                tmp_path / "data" / name / f"{i}.png"
            )
    weights = tmp_path / "w.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=2).state_dict(), str(weights))
    data = ImageFolderDataModule(root=Path(tmp_path / "data"), backbone="test_resnet", image_size=32, batch_size=4)
    model = ImageClassifier("test_resnet", weights=Path(weights), num_classes=2, strategies="linear_probe")
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)  # raised UnpicklingError (PosixPath) before
    assert checkpoint["hyper_parameters"]["weights"] == str(weights)
    assert checkpoint["datamodule_hyper_parameters"]["root"] == str(tmp_path / "data")
    reloaded = ImageClassifier.from_checkpoint(path)
    assert torch.equal(reloaded.backbone.fc.weight, model.backbone.fc.weight)
