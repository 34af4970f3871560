"""``lr=None``: the strategies' measured default learning rate, recorded as the value used."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from cvft.strategies import StrategyStack, build_strategies
from cvft.tasks import ImageClassifier
from cvft.tasks.classification import DEFAULT_LR


@pytest.mark.parametrize(
    ("strategies", "expected", "backbone"),
    [
        (None, DEFAULT_LR, "test_resnet"),
        ("linear_probe", 1e-2, "test_resnet"),
        ("classifier_only", 1e-2, "test_resnet"),
        ("bitfit", 3e-3, "test_resnet"),
        ("lora", 3e-3, "test_resnet"),
        ("qlora", 3e-3, "test_vit"),  # a LoRA
        (["lora", "supcon"], 3e-3, "test_resnet"),  # an objective has no opinion
        (["linear_probe", "lora"], 3e-3, "test_resnet"),  # the smallest default of the stack
        ("ssf", DEFAULT_LR, "test_resnet"),  # not measured yet: the task default
    ],
)
def test_learning_rate_defaults_to_the_strategies_measured_one(strategies, expected, backbone):
    model = ImageClassifier(backbone, pretrained=False, num_classes=3, strategies=strategies)
    assert model.hparams.lr == expected


def test_an_explicit_learning_rate_wins_and_optimizers_use_the_recorded_value():
    model = ImageClassifier("test_resnet", pretrained=False, num_classes=3, strategies="linear_probe", lr=2e-4)
    assert model.hparams.lr == 2e-4
    model = ImageClassifier("test_resnet", pretrained=False, num_classes=3, strategies="linear_probe")
    data = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])), batch_size=2)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, data)
    assert {group["initial_lr"] for group in trainer.optimizers[0].param_groups} == {1e-2}


def test_stack_default_is_none_without_a_measured_member():
    assert StrategyStack(build_strategies(["ssf"])).default_lr is None
