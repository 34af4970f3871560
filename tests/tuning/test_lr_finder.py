"""The learning-rate finder (cvft.tuning.lr_finder): the fit after it is the plain fit at the rate it found."""

from __future__ import annotations

import csv
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.tuner.lr_finder import _LRFinder
from torch.utils.data import TensorDataset
from tuning_kit import build, make_data, state, swept_rate, trainable, trainer_for, unchanged

from cvft.data.multitask import MultiTaskDataModule
from cvft.errors import ConfigError
from cvft.tasks.multitask import MultiTaskClassifier
from cvft.tuning import LRFinderOptions, find_learning_rate, scale_groups_during_steps

pytestmark = pytest.mark.usefixtures("one_thread")

FOUND = 0.02


COMBINATIONS = {
    "full": {},
    "lora+ema": {"strategies": "lora", "ema_decay": 0.9},
    "linear_probe+feature_cache": {"strategies": "linear_probe", "feature_cache": "memory"},
    "gradual_unfreeze": {"strategies": [{"name": "gradual_unfreeze", "milestones": [0, 1]}]},
    "layerwise_lr+mixup": {"strategies": "layerwise_lr", "mixup": 0.4, "cutmix": 1.0},
}


@pytest.mark.parametrize("options", COMBINATIONS.values(), ids=COMBINATIONS.keys())
def test_a_fit_after_the_finder_is_the_plain_fit_at_the_rate_found(options, image_root, tmp_path, monkeypatch):
    monkeypatch.setattr(_LRFinder, "suggestion", lambda self, skip_begin=10, skip_end=1: FOUND)

    pl.seed_everything(0, workers=True)
    plain = build(FOUND, **options)
    plain_trainer = trainer_for(tmp_path / "plain")
    plain_trainer.fit(plain, datamodule=make_data(image_root))

    pl.seed_everything(0, workers=True)
    auto = build("auto", **options)
    data, trainer = make_data(image_root), trainer_for(tmp_path / "auto")
    before, before_trainable = state(auto), trainable(auto)
    # 20 steps over 4-batch epochs: the sweep crosses gradual_unfreeze's milestone 1 and ends mid-epoch
    result = find_learning_rate(trainer, auto, data, LRFinderOptions(num_training=20), folder=tmp_path)
    assert result.suggestion == FOUND and auto.hparams.lr == FOUND and not auto.lr_search_pending
    assert unchanged(before, auto) and trainable(auto) == before_trainable  # the search left no trace
    trainer.fit(auto, datamodule=data)

    expected, got = state(plain), state(auto)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert trainable(auto) == trainable(plain)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert logged == {k: float(v) for k, v in plain_trainer.callback_metrics.items()}
    if options.get("feature_cache"):
        assert auto.feature_cache is not None  # both fits trained on cached features


def test_the_finder_leaves_the_model_as_it_found_it_and_writes_the_curve(image_root, tmp_path):
    torch.manual_seed(0)
    model = build("auto", strategies=[{"name": "gradual_unfreeze", "milestones": [0, 1]}])
    assert model.lr_search_pending and model.hparams.lr == 3e-4  # full fine-tuning default until the finder runs
    before, before_trainable = state(model), trainable(model)
    options = LRFinderOptions(min_lr=1e-6, max_lr=1.0, num_training=20)
    result = find_learning_rate(model=model, trainer=trainer_for(tmp_path), datamodule=make_data(image_root),
                                options=options, folder=tmp_path / "out")  # fmt: skip
    assert unchanged(before, model)
    assert trainable(model) == before_trainable  # the sweep unfroze groups at its epoch 1; they are frozen again

    assert result.suggestion is not None and model.hparams.lr == result.lr == result.suggestion
    assert model.lr_origin == "found by the LR finder"
    with open(tmp_path / "out" / "lr_find.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(result.lrs) and 13 <= len(rows) <= 20  # fewer when the loss diverges (early stop)
    lrs = [float(row["lr"]) for row in rows]
    # exponential sweep (Lightning's _ExponentialLR): min_lr, then min_lr * (max_lr / min_lr) ** ((k + 1) / steps)
    assert lrs[0] == pytest.approx(1e-6)
    for k, lr in enumerate(lrs[1:], start=1):
        assert lr == pytest.approx(1e-6 * 1e6 ** ((k + 1) / 20), rel=1e-9)
    suggested = [float(row["lr"]) for row in rows if row["suggested"] == "1"]
    assert suggested == [result.suggestion]
    assert (tmp_path / "out" / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_group_steps_at_the_swept_rate_times_its_own_ratio():
    first, second = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD(
        [{"params": [first], "lr": 0.1, "initial_lr": 0.1}, {"params": [second], "lr": 0.01, "initial_lr": 0.01}],
        lr=0.1,
    )
    handles = scale_groups_during_steps(optimizer, base_lr=0.1)
    for group in optimizer.param_groups:  # Lightning's finder writes one rate into every group
        group["lr"] = 2.0
    first.grad, second.grad = torch.ones(1), torch.ones(1)
    optimizer.step()
    assert first.item() == pytest.approx(-2.0) and second.item() == pytest.approx(-0.2)  # 2.0 x 1, 2.0 x 0.1
    assert [group["lr"] for group in optimizer.param_groups] == [2.0, 2.0]  # what the scheduler wrote, back
    for handle in handles:
        handle.remove()
    optimizer.step()
    assert second.item() == pytest.approx(-2.2)


def test_the_sweep_trains_layerwise_groups_at_their_ratios(image_root, tmp_path, adamw_rates):
    model = build(0.01, strategies=[{"name": "layerwise_lr", "decay": 0.5}])
    scales = {group["name"]: group["lr_scale"] for group in model.param_groups()}
    assert len(set(scales.values())) > 2
    find_learning_rate(trainer_for(tmp_path), model, make_data(image_root), LRFinderOptions(num_training=13),
                       folder=tmp_path)  # fmt: skip
    assert len(adamw_rates) == 13
    for step, rates in enumerate(adamw_rates):
        for name, lr in rates.items():
            assert lr == pytest.approx(swept_rate(step, 13) * scales[name], rel=1e-6), (step, name)


def test_too_few_steps_fall_back_to_the_strategies_default(image_root, tmp_path):
    model = build("auto", strategies="lora")
    trainer = trainer_for(tmp_path, epochs=1)
    result = find_learning_rate(trainer, model, make_data(image_root), LRFinderOptions(num_training=5),
                                folder=tmp_path)  # fmt: skip
    assert result.suggestion is None and "num_training" in result.fallback_reason
    assert model.hparams.lr == result.lr == 3e-3 and not model.lr_search_pending  # lora's measured default
    assert "could not suggest" in result.summary() and "3e-3" not in result.summary()
    assert "Falling back to lr 0.003 (the strategies' default; the LR finder could not suggest one)" in result.summary()
    trainer.fit(model, datamodule=make_data(image_root))
    assert {group["initial_lr"] for group in trainer.optimizers[0].param_groups} == {3e-3}


def test_a_nan_loss_falls_back_and_leaves_the_weights(image_root, tmp_path, monkeypatch):
    model = build("auto")
    monkeypatch.setattr(model, "loss", lambda logits, targets: logits.sum() * float("nan"))
    before = state(model)
    result = find_learning_rate(trainer_for(tmp_path), model, make_data(image_root), LRFinderOptions(num_training=20),
                                folder=tmp_path)  # fmt: skip
    assert result.suggestion is None and "NaN" in result.fallback_reason
    assert all(not math.isfinite(loss) for loss in result.losses)
    assert model.hparams.lr == 3e-4
    assert unchanged(before, model)


def test_a_fit_with_an_unsearched_auto_rate_is_refused(image_root, tmp_path):
    with pytest.raises(ConfigError, match="find_learning_rate"):
        trainer_for(tmp_path).fit(build("auto"), datamodule=make_data(image_root))


@pytest.mark.parametrize(
    ("options", "match"),
    [({"min_lr": 1.0, "max_lr": 0.1}, "min_lr"), ({"num_training": 0}, "num_training"),
     ({"early_stop_threshold": 0.5}, "early_stop_threshold")],
)  # fmt: skip
def test_bad_finder_options_are_refused(options, match):
    with pytest.raises(ConfigError, match=match):
        LRFinderOptions(**options)


def test_a_multitask_sweep_keeps_the_heads_ratio_and_restores_every_tensor(tmp_path, adamw_rates):
    torch.manual_seed(0)
    tasks = {"colour": {"num_classes": 3}, "shade": {"num_classes": 2}}
    model = MultiTaskClassifier(tasks, "test_resnet", pretrained=False, strategies="lora", weighting="uncertainty",
                                lr="auto", head_lr_scale=10.0, warmup_epochs=0)  # fmt: skip
    assert model.lr_search_pending and model.hparams.lr == 3e-4  # the MultiTaskClassifier default until then
    images = torch.randn(16, 3, 32, 32)
    labels = torch.arange(16)
    train = {"colour": TensorDataset(images, labels % 3), "shade": TensorDataset(images, labels % 2)}
    data = MultiTaskDataModule(train, val=train, batch_size=4, seed=0)
    before = state(model)
    options = LRFinderOptions(num_training=14, early_stop_threshold=None)  # every step, even where the loss diverges
    result = find_learning_rate(trainer_for(tmp_path), model, data, options, folder=tmp_path)

    assert unchanged(before, model)  # LoRA factors, heads and the uncertainty weights all restored
    assert result.suggestion is not None and model.hparams.lr == result.suggestion
    assert len(adamw_rates) == 14
    for step, rates in enumerate(adamw_rates):
        for name, lr in rates.items():
            expected = swept_rate(step, 14) * (10.0 if name.startswith("heads") else 1.0)
            assert lr == pytest.approx(expected, rel=1e-6), (step, name)
