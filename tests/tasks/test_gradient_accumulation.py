"""Gradient accumulation (``Trainer(accumulate_grad_batches=k)``): the warm-up + cosine schedule counts optimizer steps,
the EMA updates once per optimizer step, and frozen strategies and the feature cache train as without it."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from quiet_trainer import make_trainer
from torch.utils.data import DataLoader, TensorDataset

from cvft.callbacks import EMAWeightAveraging
from cvft.data import ImageFolderDataModule
from cvft.tasks import ImageClassifier

pytestmark = pytest.mark.usefixtures("one_thread")


def _classifier(**kwargs) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier("test_resnet", **{"pretrained": False, "num_classes": 3, **kwargs})


def _loader(n: int) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(n, 3, 32, 32, generator=generator), torch.randint(0, 3, (n,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=4)


class StepsAndRates(pl.Callback):
    """Per micro-batch: the optimizer steps taken before it and the learning rate it trains with."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(trainer.global_step)
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize(
    ("batches", "accumulate", "steps_per_epoch"),
    [(8, 2, 4), (7, 2, 4), (8, 4, 2)],  # 7 batches: the last window of an epoch is one batch, still one step
)
def test_warmup_and_cosine_count_optimizer_steps(batches, accumulate, steps_per_epoch):
    model = _classifier(optimizer="sgd", lr=0.1, warmup_epochs=1, min_lr_ratio=0.1)
    recorder = StepsAndRates()
    trainer = make_trainer(max_epochs=2, callbacks=[recorder], accumulate_grad_batches=accumulate)
    trainer.fit(model, _loader(4 * batches))
    total, warmup = 2 * steps_per_epoch, steps_per_epoch  # warmup_epochs=1 is one epoch of optimizer steps
    assert trainer.global_step == total == trainer.estimated_stepping_batches
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == total  # stepped once per optimizer step
    expected_steps = [
        min(i, batches - 1) // accumulate + epoch * steps_per_epoch for epoch in range(2) for i in range(batches)
    ]
    assert recorder.steps == expected_steps
    for step, lr in zip(recorder.steps, recorder.lrs, strict=True):
        if step < warmup:
            factor = (step + 1) / (warmup + 1)
        else:
            factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert lr == pytest.approx(0.1 * factor), f"step {step}"


class TrainedAfterEachStep(pl.Callback):
    """The head's trained weight after every optimizer step (recorded at the micro-batch that stepped)."""

    def __init__(self) -> None:
        self.history: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > len(self.history):
            self.history.append(pl_module.backbone.fc.weight.detach().clone())


def test_ema_updates_once_per_optimizer_step():
    decay = 0.8
    model = _classifier(lr=0.05, warmup_epochs=0.0, ema_decay=decay, strategies="linear_probe", feature_cache="off")
    recorder = TrainedAfterEachStep()
    trainer = make_trainer(max_epochs=1, callbacks=[recorder], accumulate_grad_batches=2)
    trainer.fit(model, _loader(32))  # 8 micro-batches, 4 optimizer steps
    ema = next(c for c in trainer.callbacks if isinstance(c, EMAWeightAveraging))
    assert trainer.global_step == len(recorder.history) == 4
    assert int(ema._average_model.n_averaged) == 4
    expected = recorder.history[0].double()
    for trained in recorder.history[1:]:
        expected = decay * expected + (1 - decay) * trained.double()
    torch.testing.assert_close(model.backbone.fc.weight.double(), expected, atol=1e-6, rtol=1e-6)


def _image_folder(root) -> ImageFolderDataModule:
    rng = np.random.default_rng(0)
    for label in range(3):
        (root / f"class{label}").mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 256, (36, 36, 3)) // 2 + 40 * label
            Image.fromarray(pixels.astype(np.uint8)).save(root / f"class{label}" / f"{i}.png")
    options = dict(image_size=32, batch_size=4, num_workers=0, augment="none", val_fraction=0.25, check_images="none")
    return ImageFolderDataModule(str(root), **options)


def test_frozen_backbone_and_feature_cache_train_the_same_head_under_accumulation(tmp_path):
    data = _image_folder(tmp_path / "images")
    heads = {}
    for mode in ("off", "memory"):
        model = _classifier(strategies="linear_probe", lr=0.05, feature_cache=mode)
        frozen = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if not p.requires_grad}
        pl.seed_everything(0)
        trainer = make_trainer(max_epochs=2, accumulate_grad_batches=2, deterministic=True)
        trainer.fit(model, datamodule=data)
        assert (model.feature_cache is not None) == (mode == "memory")
        assert trainer.global_step == 2 * math.ceil(len(trainer.train_dataloader) / 2)
        assert all(torch.equal(p, frozen[n]) for n, p in model.backbone.named_parameters() if n in frozen)
        heads[mode] = model.backbone.fc.weight.detach().clone()
    assert not torch.equal(heads["off"], _classifier().backbone.fc.weight)
    torch.testing.assert_close(heads["memory"], heads["off"], atol=1e-5, rtol=0)
