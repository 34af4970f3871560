"""Preference objectives through ImageClassifier: PPO / TRPO under manual optimisation, DPO on pair batches."""

from __future__ import annotations

import pytest
import torch
from quiet_trainer import make_trainer
from torch.utils.data import DataLoader, TensorDataset

from cvft.data.preference import PreferencePairDataset, pairs_from_labels
from cvft.tasks import ImageClassifier


def _loader(n: int = 16) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    targets = torch.randint(3, (n,), generator=generator)
    return DataLoader(TensorDataset(images, targets), batch_size=8)


@pytest.mark.parametrize(
    "objective",
    [
        {"name": "ppo", "reward": {"cost_matrix": [[0, 1, 1], [5, 0, 1], [1, 1, 0]]}, "epochs": 2, "minibatches": 2},
        {"name": "trpo", "max_kl": 0.01},
    ],
)
def test_self_stepping_objective_trains_the_head_only(tmp_path, objective):
    torch.manual_seed(0)
    model = ImageClassifier("test_resnet", pretrained=False, num_classes=3, strategies=["linear_probe", objective])
    assert not model.automatic_optimization
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    trainer = make_trainer(default_root_dir=tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=_loader())
    changed = {n for n, p in model.backbone.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= {"fc.weight", "fc.bias"}
    expected_steps = 2 * 2 * 2 if objective["name"] == "ppo" else 2  # batches x epochs x minibatches
    assert trainer.global_step == expected_steps
    state = trainer.callback_metrics
    assert f"train/{objective['name']}/reward" in state


def test_dpo_trains_on_pair_batches(tmp_path):
    torch.manual_seed(0)
    base = list(zip(torch.randn(16, 3, 32, 32), torch.randint(3, (16,)).tolist(), strict=True))
    pairs = PreferencePairDataset(pairs_from_labels([t for _, t in base], num_classes=3), images=base)
    model = ImageClassifier("test_resnet", pretrained=False, num_classes=3, strategies=["linear_probe", "dpo"])
    trainer = make_trainer(default_root_dir=tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=DataLoader(pairs, batch_size=8))
    assert trainer.global_step == 2
    assert "train/dpo/dpo" in trainer.callback_metrics
    checkpoint = {}
    model.on_save_checkpoint(checkpoint)
    snapshot = checkpoint["cvft_strategies"]["dpo"]["reference"]["snapshot"]
    assert set(snapshot) >= {"fc.weight", "fc.bias"}
