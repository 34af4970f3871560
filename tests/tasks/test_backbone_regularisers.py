"""Backbone regularisers: ``drop_rate`` and ``drop_path_rate`` reach timm's modules, bad values and backbones without
them are refused, and ``drop_path_schedule`` sets every block's rate to the hand-computed value of the optimizer step
(with gradient accumulation, after a resume, under strategies), leaving evaluation untouched."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from quiet_trainer import make_trainer
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from cvft.backbones.factory import BackboneOptionError
from cvft.callbacks.drop_path import DropPathSchedule, drop_path_rates
from cvft.errors import ConfigError
from cvft.tasks import ImageClassifier, MultiTaskClassifier, ObjectDetector

pytestmark = pytest.mark.usefixtures("one_thread")

#: test_resnet with drop_path_rate=0.3: timm's linear depth rule over its blocks (layer1's is at 0: no DropPath).
RESNET_RATES = {
    "backbone.layer2.0.drop_path": 0.1,
    "backbone.layer3.0.drop_path": 0.2,
    "backbone.layer4.0.drop_path": 0.3,
}


def _classifier(backbone: str = "test_resnet", **kwargs) -> ImageClassifier:
    torch.manual_seed(0)
    options = dict(pretrained=False, num_classes=3, lr=0.01, warmup_epochs=0.0)
    return ImageClassifier(backbone, **{**options, **kwargs})


def _loader(n: int = 16, batch_size: int = 4) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(n, 3, 32, 32, generator=generator), torch.randint(0, 3, (n,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size)


class RecordRates(pl.Callback):
    """Per training batch: the optimizer step it belongs to and the drop-path rates its forward used."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.rates: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rates.append({name: round(rate, 6) for name, rate in drop_path_rates(pl_module).items()})


def _scaled(factor: float) -> dict[str, float]:
    return {name: round(rate * factor, 6) for name, rate in RESNET_RATES.items()}


# --------------------------------------------------------------------------- drop_rate and drop_path_rate reach timm
@pytest.mark.parametrize("backbone", ["test_resnet", "test_convnext", "test_efficientnet", "test_vit"])
def test_drop_rate_is_the_dropout_before_the_classifier(backbone):
    model = _classifier(backbone, drop_rate=0.5).backbone
    model.eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        body = model.forward_features(images)
        pooled = model.forward_head(body, pre_logits=True)
        model.train()
        torch.manual_seed(1)
        dropped = model.forward_head(body, pre_logits=True)
        torch.manual_seed(1)
        expected = F.dropout(pooled, 0.5, training=True)
    torch.testing.assert_close(dropped, expected)
    assert not torch.equal(dropped, pooled)


#: timm's per-block rates for drop_path_rate=0.2: depth-proportional, blocks at rate 0 get no DropPath.
DEPTH_RATES = {
    "test_resnet": [0.2 * i / 3 for i in (1, 2, 3)],
    "test_convnext": [0.2 * i / 8 for i in range(1, 9)],
    "test_efficientnet": [0.2 * i / 5 for i in (1, 2, 3, 4)],
    "test_vit": [0.2 * i / 5 for i in (1, 1, 2, 2, 3, 3, 4, 4, 5, 5)],  # two DropPath per block, block 0 at rate 0
}


@pytest.mark.parametrize("backbone", list(DEPTH_RATES))
def test_drop_path_rate_reaches_every_block_with_timms_depth_ratio(backbone):
    rates = list(drop_path_rates(_classifier(backbone, drop_path_rate=0.2).backbone).values())
    assert rates == pytest.approx(DEPTH_RATES[backbone])
    assert drop_path_rates(_classifier(backbone).backbone) == {}, "unset: timm's default (none)"


def test_multitask_and_detector_pass_the_rates_to_timm():
    tasks = {"shape": {"num_classes": 3}}
    multitask = MultiTaskClassifier(tasks, "test_resnet", pretrained=False, drop_rate=0.4, drop_path_rate=0.3)
    assert multitask.backbone.drop_rate == 0.4
    assert drop_path_rates(multitask) == pytest.approx(RESNET_RATES)
    detector = ObjectDetector(2, backbone="test_resnet", pretrained=False, image_size=64, drop_path_rate=0.3)
    assert drop_path_rates(detector) == pytest.approx(RESNET_RATES)


@pytest.mark.parametrize("option", ["drop_rate", "drop_path_rate"])
@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_rates_outside_zero_one_are_refused(option, value):
    with pytest.raises(ConfigError, match=rf"{option}={value} is out of range; {option} must be in \[0, 1\)"):
        _classifier(**{option: value})


def test_a_backbone_without_drop_path_is_refused_by_name():
    with pytest.raises(
        BackboneOptionError, match="'ghostnet_050' does not take drop_path_rate=0.1: it has no stochastic"
    ):
        _classifier("ghostnet_050", drop_path_rate=0.1)
    assert _classifier("ghostnet_050", drop_rate=0.1).backbone.drop_rate == 0.1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"drop_path_schedule": "linear"}, "no drop path at a rate above 0: set drop_path_rate"),
        ({"drop_path_schedule": "linear", "drop_path_rate": 0.0}, "no drop path at a rate above 0"),
        ({"drop_path_schedule": "early", "drop_path_rate": 0.1}, "pass drop_path_epochs"),
        ({"drop_path_epochs": 2.0, "drop_path_rate": 0.1}, "used by drop_path_schedule='early' only"),
        ({"drop_path_schedule": "cosine", "drop_path_rate": 0.1}, "Unknown drop_path_schedule 'cosine'"),
        ({"drop_path_schedule": "early", "drop_path_rate": 0.1, "drop_path_epochs": 0.0}, "drop_path_epochs=0.0"),
    ],
)
def test_schedules_that_cannot_work_are_refused_at_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        _classifier(**kwargs)


# --------------------------------------------------------------------------- the schedule
def test_linear_schedule_ramps_every_block_from_zero_to_its_rate():
    model = _classifier(drop_path_rate=0.3, drop_path_schedule="linear")
    recorder = RecordRates()
    make_trainer(max_epochs=2, callbacks=[recorder]).fit(model, _loader())
    assert recorder.steps == list(range(8))  # 4 batches x 2 epochs, one optimizer step each
    assert recorder.rates == [_scaled(step / 8) for step in range(8)]
    assert recorder.rates[2] == {
        "backbone.layer2.0.drop_path": 0.025,
        "backbone.layer3.0.drop_path": 0.05,
        "backbone.layer4.0.drop_path": 0.075,
    }
    assert drop_path_rates(model) == pytest.approx(RESNET_RATES), "the configured rates come back after the fit"


def test_early_schedule_drops_for_the_first_epochs_then_stops():
    model = _classifier(drop_path_rate=0.3, drop_path_schedule="early", drop_path_epochs=0.5)
    recorder = RecordRates()
    make_trainer(max_epochs=2, callbacks=[recorder]).fit(model, _loader())
    # 8 optimizer steps in 2 epochs: half an epoch is 2 steps
    assert recorder.rates == [_scaled(1.0)] * 2 + [_scaled(0.0)] * 6


def test_the_rate_follows_optimizer_steps_under_gradient_accumulation():
    model = _classifier(drop_path_rate=0.3, drop_path_schedule="linear")
    recorder = RecordRates()
    trainer = make_trainer(max_epochs=1, callbacks=[recorder], accumulate_grad_batches=2)
    trainer.fit(model, _loader(n=32))  # 8 batches, 4 optimizer steps
    assert trainer.global_step == 4
    assert recorder.steps == [0, 0, 1, 1, 2, 2, 3, 3]
    assert recorder.rates == [_scaled(step / 4) for step in recorder.steps]


def test_a_resumed_fit_sets_the_same_rates_as_the_uninterrupted_one(tmp_path):
    whole = RecordRates()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    make_trainer(max_epochs=1, callbacks=[checkpoints], enable_checkpointing=True).fit(
        _classifier(drop_path_rate=0.3, drop_path_schedule="linear"), _loader()
    )
    make_trainer(max_epochs=2, callbacks=[whole]).fit(
        _classifier(drop_path_rate=0.3, drop_path_schedule="linear"), _loader()
    )
    resumed = RecordRates()
    model = _classifier(drop_path_rate=0.3, drop_path_schedule="linear")
    make_trainer(max_epochs=2, callbacks=[resumed]).fit(model, _loader(), ckpt_path=tmp_path / "last.ckpt")
    assert resumed.steps == [4, 5, 6, 7]
    assert resumed.rates == whole.rates[4:] == [_scaled(step / 8) for step in range(4, 8)]


class CheckEvalIsUnaffected(pl.Callback):
    """At each validation during the fit (rates scaled), eval outputs equal those with every rate at 0."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images
        self.checked: list[float] = []

    def on_validation_start(self, trainer, pl_module):
        modules = [m for m in pl_module.modules() if type(m).__name__ == "DropPath"]
        rates = [m.drop_prob for m in modules]
        with torch.no_grad():
            scheduled = pl_module(self.images)
            for module in modules:
                module.drop_prob = 0.0
            plain = pl_module(self.images)
            for module, rate in zip(modules, rates, strict=True):
                module.drop_prob = rate
        assert not pl_module.training and torch.equal(scheduled, plain)
        self.checked.append(max(rates))


def test_evaluation_is_unaffected_by_the_schedule():
    model = _classifier(drop_path_rate=0.3, drop_path_schedule="linear")
    check = CheckEvalIsUnaffected(torch.randn(2, 3, 32, 32))
    make_trainer(max_epochs=2, callbacks=[check]).fit(model, _loader(), _loader(n=4))
    assert check.checked == pytest.approx([0.3 * 3 / 8, 0.3 * 7 / 8])  # rates of the last step of each epoch
    model.train()  # and the rates do act in training mode
    torch.manual_seed(0)
    first = model(check.images)
    assert not torch.equal(first, model(check.images))


@pytest.mark.parametrize("strategies", ["lora", "linear_probe", "classifier_only", "bitfit"])
def test_the_schedule_runs_under_every_kind_of_strategy(strategies):
    model = _classifier(drop_path_rate=0.3, drop_path_schedule="linear", strategies=strategies, feature_cache="off")
    recorder = RecordRates()
    make_trainer(max_epochs=1, callbacks=[recorder]).fit(model, _loader())
    assert recorder.rates == [_scaled(step / 4) for step in range(4)]


def test_the_schedule_is_a_model_callback_saved_with_the_hparams(tmp_path):
    model = _classifier(drop_path_rate=0.3, drop_path_schedule="early", drop_path_epochs=1.5, drop_rate=0.2)
    (schedule,) = model.configure_callbacks()
    assert isinstance(schedule, DropPathSchedule) and (schedule.schedule, schedule.epochs) == ("early", 1.5)
    trainer = make_trainer(max_epochs=1)
    trainer.fit(model, _loader())
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    reloaded = ImageClassifier.from_checkpoint(tmp_path / "model.ckpt")
    assert {k: reloaded.hparams[k] for k in ("drop_rate", "drop_path_schedule", "drop_path_epochs")} == {
        "drop_rate": 0.2,
        "drop_path_schedule": "early",
        "drop_path_epochs": 1.5,
    }
    assert drop_path_rates(reloaded) == pytest.approx(RESNET_RATES)
