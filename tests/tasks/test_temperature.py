"""Temperature scaling (``temperature_scaling``): the fitted T against a grid search, NLL and ECE against hand
computations, argmax kept, T in every checkpoint for its own weights (with LoRA, EMA and Mixup), in the adapter file,
applied by predict, and old checkpoints without it still loading (the CLI run: tests/cli/test_calibration_cli.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from quiet_trainer import make_trainer
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

from cvft.adapter_files import read_adapter
from cvft.callbacks.ema import trained_tensors
from cvft.errors import ConfigError, WeightsError
from cvft.tasks import ImageClassifier
from cvft.tasks.temperature import (
    MIN_TEMPERATURE,
    calibrate_temperature,
    expected_calibration_error,
    fit_temperature,
    scaled_probabilities,
)


def _grid_minimum(logits: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> float:
    """The NLL's minimum over T by brute force: a 0.01 grid on [0.5, 10], then a 1e-5 grid around its best."""

    def best(grid: torch.Tensor) -> float:
        scaled = logits[None] / grid[:, None, None]  # (grid, N, C): every temperature at once
        if multi_label:
            nll = F.binary_cross_entropy_with_logits(scaled, targets.expand_as(scaled), reduction="none").mean((1, 2))
        else:
            nll = -scaled.log_softmax(-1).gather(2, targets.expand(len(grid), -1)[..., None]).mean((1, 2))
        return float(grid[nll.argmin()])

    coarse = best(torch.arange(0.5, 10.0, 0.01, dtype=torch.float64))
    return best(torch.arange(coarse - 0.01, coarse + 0.01, 1e-5, dtype=torch.float64))


def _overconfident(n: int, classes: int, factor: float, multi_label: bool, seed: int = 0):
    """Labels drawn from calibrated logits ``z``; the model reports ``factor * z`` (too confident for factor > 1)."""
    generator = torch.Generator().manual_seed(seed)
    true_logits = 1.5 * torch.randn(n, classes, generator=generator, dtype=torch.float64)
    if multi_label:
        targets = torch.bernoulli(true_logits.sigmoid(), generator=generator)
    else:
        targets = torch.multinomial(true_logits.softmax(-1), 1, generator=generator).squeeze(1)
    return factor * true_logits, targets


@pytest.mark.parametrize("multi_label", [False, True])
def test_fitted_temperature_is_the_nll_minimum_lowers_it_and_keeps_every_decision(multi_label):
    logits, targets = _overconfident(400, 4, factor=5.0, multi_label=multi_label)
    temperature = fit_temperature(logits, targets, multi_label)
    assert abs(temperature - _grid_minimum(logits, targets, multi_label)) < 1e-3
    assert 3.0 < temperature < 8.0  # the labels came from logits five times smaller
    fit = calibrate_temperature(logits, targets, multi_label)
    assert fit.temperature == temperature
    assert fit.nll_after < fit.nll_before - 0.1 and fit.ece_after < fit.ece_before
    after = scaled_probabilities(logits, temperature, multi_label)
    if multi_label:  # one side of 0.5 or the other, as the logits' sign
        assert torch.equal(after >= 0.5, logits >= 0)
    else:
        assert torch.equal(after.argmax(-1), logits.argmax(-1))
    # an underconfident model gets T < 1
    small, labels = _overconfident(400, 4, factor=0.3, multi_label=multi_label, seed=1)
    assert fit_temperature(small, labels, multi_label) < 0.6


def test_separable_validation_logits_give_the_lower_bound():
    logits = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    assert fit_temperature(logits, torch.tensor([0, 1, 0])) == MIN_TEMPERATURE


def test_ece_equals_a_hand_computation_and_torchmetrics():
    probs = torch.tensor([[0.95, 0.05], [0.62, 0.38], [0.36, 0.64], [0.30, 0.70], [0.51, 0.49]], dtype=torch.float64)
    targets = torch.tensor([0, 1, 1, 0, 0])
    # top-1 confidences 0.95, 0.62, 0.64, 0.70, 0.51 (right, wrong, right, wrong, right); 15 bins of width 1/15
    # (none on a bin edge): 0.95 -> bin 14, 0.62 and 0.64 -> bin 9 (mean 0.63, accuracy 0.5), 0.70 -> 10, 0.51 -> 7
    hand = (abs(1 - 0.95) + 2 * abs(0.5 - 0.63) + abs(0 - 0.70) + abs(1 - 0.51)) / 5
    assert expected_calibration_error(probs, targets) == pytest.approx(hand, abs=1e-12)
    reference = multiclass_calibration_error(probs.float(), targets, num_classes=2, n_bins=15, norm="l1")
    assert expected_calibration_error(probs, targets) == pytest.approx(float(reference), abs=1e-6)
    # multi-label: each of the 10 (image, label) probabilities against its label, in one pool
    labels = torch.tensor([[1, 0], [0, 0], [1, 1], [0, 1], [1, 0]])
    # bins: 0.05 (0) | 0.30 (0) | 0.38 (0), 0.36 (1) | 0.51 (1), 0.49 (0) | 0.62 (0), 0.64 (1) | 0.70 (1) | 0.95 (1)
    hand = (0.05 + 0.30 + 2 * abs(0.5 - 0.37) + 0 + 2 * abs(0.5 - 0.63) + 0.30 + 0.05) / 10
    assert expected_calibration_error(probs, labels, multi_label=True) == pytest.approx(hand, abs=1e-12)
    pooled = binary_calibration_error(probs.float().reshape(-1), labels.reshape(-1), n_bins=15, norm="l1")
    assert expected_calibration_error(probs, labels, multi_label=True) == pytest.approx(float(pooled), abs=1e-6)


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % 3
    images = torch.randn(n, 3, 32, 32, generator=generator) + 0.5 * targets[:, None, None, None].float()
    return images, targets


def _loader(n: int = 16, seed: int = 0, **kwargs) -> DataLoader:
    return DataLoader(TensorDataset(*_images(n, seed)), batch_size=8, **kwargs)


class Overconfident(ImageClassifier):
    """A classifier whose logits are five times too large: a deliberately miscalibrated toy."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return 5.0 * super().forward(images)


def _classifier(cls=ImageClassifier, **kwargs) -> ImageClassifier:
    torch.manual_seed(0)
    options = dict(pretrained=False, num_classes=3, lr=0.02, warmup_epochs=0.0, temperature_scaling=True)
    return cls("test_resnet", **{**options, **kwargs})


def _logits(model: ImageClassifier, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.eval()(batch) for batch in images.split(8)])


def test_fit_calibrates_a_miscalibrated_model_and_predict_applies_the_temperature():
    model = _classifier(Overconfident)
    val_images, val_targets = _images(24, seed=1)
    trainer = make_trainer(max_epochs=1, num_sanity_val_steps=2)
    trainer.fit(model, _loader(), DataLoader(TensorDataset(val_images, val_targets), batch_size=8))
    logits = _logits(model, val_images)  # the final weights, validated at the end of the fit
    fit = model.temperature_fit
    assert fit is not None and fit.samples == 24  # the sanity check's batches are not counted
    assert fit.temperature == pytest.approx(fit_temperature(logits, val_targets), rel=1e-5)
    assert float(model.temperature) == pytest.approx(fit.temperature, rel=1e-6)
    assert fit.nll_after < fit.nll_before and fit.temperature > 1.5
    assert fit.nll_before == pytest.approx(F.cross_entropy(logits.double(), val_targets).item(), rel=1e-5)
    logged = trainer.callback_metrics
    assert float(logged["val/temperature"]) == pytest.approx(fit.temperature, rel=1e-6)
    assert float(logged["val/ece_scaled"]) == pytest.approx(fit.ece_after, abs=1e-6)
    assert float(logged["val/loss"]) == pytest.approx(fit.nll_before, rel=1e-5)  # validation: the plain logits

    predict = DataLoader(TensorDataset(val_images, torch.arange(24)), batch_size=8)
    probs = torch.cat([out["probs"] for out in trainer.predict(model, predict)])
    torch.testing.assert_close(probs, (logits / model.temperature).softmax(-1), atol=1e-6, rtol=0)
    assert torch.equal(probs.argmax(-1), logits.argmax(-1))
    test = trainer.test(model, DataLoader(TensorDataset(val_images, val_targets), batch_size=24))[0]
    assert test["test/loss"] == pytest.approx(fit.nll_after, rel=1e-4)


def test_every_checkpoint_holds_the_temperature_of_its_own_weights_with_lora_ema_and_mixup(tmp_path):
    model = _classifier(strategies="lora", ema_decay=0.5, mixup=0.2)
    assert "temperature" not in dict(trained_tensors(model, use_buffers=True))  # the EMA leaves T alone
    val_images, val_targets = _images(16, seed=1)
    checkpoints = ModelCheckpoint(tmp_path, filename="{epoch}", save_top_k=-1, save_last=True)
    trainer = make_trainer(max_epochs=3, callbacks=[checkpoints], enable_checkpointing=True)
    trainer.fit(model, _loader(seed=0, shuffle=True), DataLoader(TensorDataset(val_images, val_targets), batch_size=8))
    temperatures = []
    for name in ("epoch=0", "epoch=1", "epoch=2", "last"):
        saved = ImageClassifier.from_checkpoint(tmp_path / f"{name}.ckpt")
        temperature = float(saved.temperature)
        # the temperature fitted on the validation logits of the very weights the file holds (the EMA)
        assert temperature == pytest.approx(fit_temperature(_logits(saved, val_images), val_targets), rel=1e-5), name
        temperatures.append(temperature)
    assert len(set(temperatures[:3])) == 3 and temperatures[3] == temperatures[2]
    assert float(model.temperature) == temperatures[3]


def test_temperature_travels_in_the_adapter_file(tmp_path):
    model = _classifier(strategies="lora")
    model.temperature.fill_(2.5)
    path = model.save_adapter(tmp_path / "adapter")
    assert read_adapter(path)[1].temperature == 2.5
    loaded = _classifier(strategies="lora", adapter=str(path))  # same seed: the same base weights
    assert float(loaded.temperature) == 2.5
    images = _images(4, seed=2)[0]
    probs = loaded.eval().predict_step((images, torch.arange(4)), 0)["probs"]
    torch.testing.assert_close(probs, (_logits(model, images) / 2.5).softmax(-1), atol=1e-6, rtol=0)
    plain = _classifier(strategies="lora")
    assert read_adapter(plain.save_adapter(tmp_path / "plain"))[1].temperature == 1.0


def test_an_adapter_with_a_damaged_temperature_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _classifier(strategies="lora")
    model.temperature.fill_(2.0)
    path = model.save_adapter(tmp_path / "adapter")
    _, info = read_adapter(path)
    metadata = {key: value if isinstance(value, str) else json.dumps(value) for key, value in info.items()}
    save_file(load_file(str(path)), str(path), metadata={**metadata, "temperature": "-1"})
    with pytest.raises(WeightsError, match="temperature"):
        read_adapter(path)


def test_checkpoints_written_before_temperature_scaling_still_load(tmp_path):
    model = _classifier(temperature_scaling=False)
    trainer = make_trainer(max_epochs=1, default_root_dir=tmp_path)
    trainer.fit(model, _loader())
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=True)
    del checkpoint["state_dict"]["temperature"]
    for key in ("temperature_scaling", "tta", "tta_crop_pct"):
        checkpoint["hyper_parameters"].pop(key)
    torch.save(checkpoint, tmp_path / "old.ckpt")

    old = ImageClassifier.from_checkpoint(tmp_path / "old.ckpt")  # strict loading
    assert float(old.temperature) == 1.0 and old.hparams.tta == "none"
    fresh = _classifier(temperature_scaling=False)
    fresh.temperature.fill_(3.0)
    predict = DataLoader(TensorDataset(_images(8, 1)[0], torch.arange(8)), batch_size=8)
    probs = make_trainer().predict(fresh, predict, ckpt_path=tmp_path / "old.ckpt")[0]["probs"]
    assert float(fresh.temperature) == 1.0
    torch.testing.assert_close(probs, _logits(old, _images(8, 1)[0]).softmax(-1), atol=1e-6, rtol=0)


def test_temperature_scaling_without_validation_data_is_refused_before_training():
    model = _classifier()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ConfigError, match="validation data"):
        make_trainer(max_epochs=1).fit(model, _loader())
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    with pytest.raises(ConfigError, match="limit_val_batches"):
        make_trainer(max_epochs=1, limit_val_batches=0).fit(model, _loader(), _loader(seed=1))


def test_a_fit_without_temperature_scaling_forgets_an_earlier_temperature():
    model = _classifier(temperature_scaling=False)
    model.temperature.fill_(2.0)
    make_trainer(max_epochs=1, limit_train_batches=1).fit(model, _loader(), _loader(seed=1))
    assert float(model.temperature) == 1.0 and model.temperature_fit is None
    assert math.isfinite(float(model.temperature))
