"""EMA of weights on the multi-task classifier and the detector (the classifier's own tests: test_ema.py), and the
warning for a decay too high for the run's length."""

from __future__ import annotations

import warnings

import pytest
import torch
from quiet_trainer import make_trainer
from test_ema import RecordTrained, _averaged_names, _ema_callback, _hand_ema
from torch.utils.data import DataLoader

from cvft.callbacks import EMAWeightAveraging
from cvft.errors import ConfigError
from cvft.tasks import MultiTaskClassifier, ObjectDetector

DECAY = 0.6  # high enough to differ from the last step, low enough not to warn on 6 steps (0.6**6 < 0.05)
TASKS = {"shape": {"num_classes": 3}, "tags": {"num_classes": 2, "multi_label": True}}


def _multitask_batches() -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for index in range(6):
        images = torch.randn(4, 3, 32, 32, generator=generator)
        if index % 2:
            targets = torch.randint(0, 2, (4, 2), generator=generator).float()
            batches.append({"images": images, "targets": targets, "task": "tags"})
        else:
            batches.append(
                {"images": images, "targets": torch.randint(0, 3, (4,), generator=generator), "task": "shape"}
            )
    return batches


def _detection_batches() -> list[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(6):
        images = [torch.rand(3, 64, 64, generator=generator) * 0.2 for _ in range(2)]
        targets = [{"boxes": torch.tensor([[8.0, 10, 30, 36]]), "labels": torch.tensor([index])} for index in (0, 1)]
        batches.append((images, targets))
    return batches


def _check_hand_average(model: torch.nn.Module, batches: list, strategies: str | None) -> None:
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    recorder = RecordTrained(_averaged_names(model))
    trainer = make_trainer(max_epochs=1, callbacks=[recorder])
    trainer.fit(model, DataLoader(batches, batch_size=None))  # one ready batch per item
    assert len(recorder.history) == len(batches)
    assert sorted(_ema_callback(trainer).averaged_names) == sorted(recorder.names)
    final = model.state_dict()
    changed = False
    for name, value in _hand_ema(recorder.history, DECAY, warmup=False).items():
        torch.testing.assert_close(final[name].double(), value, atol=1e-6, rtol=1e-6)
        changed |= not torch.equal(final[name], recorder.history[-1][name])
    assert changed, "the EMA should differ from the last trained values"
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen), strategies


@pytest.mark.parametrize("strategies", [None, "lora"])
def test_multitask_ema_is_the_hand_average(strategies):
    torch.manual_seed(0)
    model = MultiTaskClassifier(
        TASKS, "test_resnet", pretrained=False, strategies=strategies, lr=0.02, warmup_epochs=0, ema_decay=DECAY
    )
    _check_hand_average(model, _multitask_batches(), strategies)


def test_detector_ema_is_the_hand_average():
    torch.manual_seed(0)
    model = ObjectDetector(
        2, backbone="test_resnet", pretrained=False, image_size=64, fpn_channels=32, lr=1e-3, warmup_epochs=0,
        strategies="lora", ema_decay=DECAY,
    )  # fmt: skip
    _check_hand_average(model, _detection_batches(), "lora")


def test_ema_refuses_unfreezing_strategies_on_every_task():
    with pytest.raises(ConfigError, match="gradual_unfreeze"):
        MultiTaskClassifier(TASKS, "test_resnet", pretrained=False, strategies="gradual_unfreeze", ema_decay=0.9)
    with pytest.raises(ConfigError, match=r"ema_decay=1\.5 is out of range"):
        ObjectDetector(2, backbone="test_resnet", pretrained=False, image_size=64, ema_decay=1.5)


@pytest.mark.parametrize(("decay", "warmup", "warns"), [(0.99, False, True), (0.99, True, False), (0.5, False, False)])
def test_a_decay_too_high_for_the_run_warns_with_a_decay_that_fits(decay, warmup, warns):
    torch.manual_seed(0)
    model = MultiTaskClassifier(TASKS, "test_resnet", pretrained=False, lr=0.01, ema_decay=decay, ema_warmup=warmup)
    trainer = make_trainer(max_epochs=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(model, DataLoader(_multitask_batches(), batch_size=None))
    messages = [str(w.message) for w in record if "EMA decay" in str(w.message)]
    assert bool(messages) == warns
    if warns:
        # 6 steps: 0.99**6 = 94% of the average is the first step's weights; 0.05**(1/6) = 0.607 would fit
        assert "94%" in messages[0] and "ema_decay <= 0.607" in messages[0] and "ema_warmup" in messages[0]
    assert isinstance(_ema_callback(trainer), EMAWeightAveraging)
