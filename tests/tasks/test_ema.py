"""EMA of weights (``ema_decay``): a hand-computed exponential average, trainable tensors only, evaluation and
prediction on the EMA, exact resume (the CLI's checkpoints and adapter file: tests/cli/test_ema_cli.py)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from quiet_trainer import make_trainer
from torch.utils.data import DataLoader, TensorDataset

from cvft.callbacks import EMAWeightAveraging
from cvft.errors import ConfigError
from cvft.tasks import ImageClassifier

DECAY = 0.8


class RecordTrained(pl.Callback):
    """Record the averaged tensors' trained values after every optimizer step (before any EMA swap)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.history: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        state = pl_module.state_dict()
        self.history.append({name: state[name].detach().clone() for name in self.names})


def _averaged_names(model: torch.nn.Module) -> list[str]:
    """What the EMA should average, listed independently: trainable parameters, float persistent buffers."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    return names + [name for name, b in model.state_dict().items() if "running_" in name and b.is_floating_point()]


def _hand_ema(history: list[dict[str, torch.Tensor]], decay: float, warmup: bool) -> dict[str, torch.Tensor]:
    ema = {name: value.double() for name, value in history[0].items()}  # the first update copies
    for n, step in enumerate(history[1:], start=1):
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        ema = {name: d * ema[name] + (1 - d) * step[name].double() for name in ema}
    return ema


def _images(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def _loader(n: int = 16, seed: int = 0) -> DataLoader:
    return DataLoader(TensorDataset(*_images(n, seed)), batch_size=4)


def _classifier(backbone: str = "test_resnet", **kwargs) -> ImageClassifier:
    torch.manual_seed(0)
    options = dict(pretrained=False, num_classes=3, lr=0.05, warmup_epochs=0.0, ema_decay=DECAY)
    return ImageClassifier(backbone, **{**options, **kwargs})


def _ema_callback(trainer: pl.Trainer) -> EMAWeightAveraging:
    return next(c for c in trainer.callbacks if isinstance(c, EMAWeightAveraging))


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_equals_the_hand_computed_average_of_the_trained_history(warmup):
    model = _classifier(ema_warmup=warmup)
    recorder = RecordTrained(_averaged_names(model))
    trainer = make_trainer(max_epochs=2, callbacks=[recorder])
    trainer.fit(model, _loader())
    assert len(recorder.history) == 8
    assert sorted(_ema_callback(trainer).averaged_names) == sorted(recorder.names)
    expected = _hand_ema(recorder.history, DECAY, warmup)
    final = model.state_dict()  # the fit ends with the EMA in the model
    for name, value in expected.items():
        # float32 averages against a float64 hand computation: 1e-6 absolute, and relative for BatchNorm variances ~20
        torch.testing.assert_close(final[name].double(), value, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(final["backbone.fc.weight"], recorder.history[-1]["backbone.fc.weight"])
    assert torch.equal(final["backbone.bn1.num_batches_tracked"], torch.tensor(8)), "integer buffers stay live"


def test_lora_ema_copies_and_averages_only_the_trainable_tensors():
    model = _classifier("test_vit", strategies="lora")
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    trainer = make_trainer(max_epochs=1)
    trainer.fit(model, _loader())
    ema = _ema_callback(trainer)
    assert sorted(ema.averaged_names) == sorted(trainable) and any("lora" in name for name in trainable)
    copied = sum(t.numel() for t in ema._average_model.module.state_dict().values())
    assert copied == sum(trainable.values()) < sum(p.numel() for p in frozen.values()) / 10
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)


def test_validation_and_predict_use_the_ema_weights():
    model = _classifier()
    recorder = RecordTrained(_averaged_names(model))
    trainer = make_trainer(max_epochs=2, callbacks=[recorder])
    val_images, val_targets = _images(8, seed=1)
    trainer.fit(model, _loader(), DataLoader(TensorDataset(val_images, val_targets), batch_size=8))
    logged = trainer.callback_metrics["val/loss"]

    with_ema = _classifier()
    state = model.state_dict()
    with_ema.load_state_dict({**state, **{k: v.float() for k, v in _hand_ema(recorder.history, DECAY, False).items()}})
    with_trained = _classifier()
    with_trained.load_state_dict({**state, **recorder.history[-1]})
    with torch.no_grad():
        ema_logits = with_ema.eval()(val_images)
        trained_logits = with_trained.eval()(val_images)
    torch.testing.assert_close(logged, torch.nn.functional.cross_entropy(ema_logits, val_targets), atol=1e-5, rtol=0)
    assert not torch.allclose(ema_logits, trained_logits, atol=1e-3)

    predict = DataLoader(TensorDataset(val_images, torch.arange(8)), batch_size=4)
    probs = torch.cat([out["probs"] for out in trainer.predict(model, predict)])
    torch.testing.assert_close(probs, ema_logits.softmax(-1), atol=1e-5, rtol=0)


class StopAfterFirstEpoch(pl.Callback):
    """Interrupt a fit after its first epoch (same ``max_epochs``, so the same learning-rate schedule)."""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def test_resumed_fit_continues_the_same_ema(tmp_path):
    def fit(folder, *callbacks, ckpt_path=None) -> ImageClassifier:
        model = _classifier(strategies="lora", backbone="test_vit")
        checkpoint = ModelCheckpoint(dirpath=folder, save_last=True)
        trainer = make_trainer(max_epochs=3, callbacks=[*callbacks, checkpoint], enable_checkpointing=True)
        trainer.fit(model, _loader(), ckpt_path=ckpt_path)
        return model

    uninterrupted = fit(tmp_path / "a")
    fit(tmp_path / "b", StopAfterFirstEpoch())
    saved = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)
    assert saved["epoch"] == 0 and saved["cvft_ema"]["n_averaged"].item() == 4
    lora = [name for name in saved["cvft_ema"]["trained"] if "lora_B" in name]
    assert lora and not torch.equal(saved["state_dict"][lora[0]], saved["cvft_ema"]["trained"][lora[0]])
    resumed = fit(tmp_path / "b", ckpt_path=tmp_path / "b" / "last.ckpt")
    expected = uninterrupted.state_dict()
    for name, value in resumed.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=0, msg=name)
    assert torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)["cvft_ema"]["n_averaged"].item() == 12


def test_bad_ema_options_are_refused():
    with pytest.raises(ConfigError, match=r"ema_decay=1\.0 is out of range.*--model.ema_decay"):
        _classifier(ema_decay=1.0)
    with pytest.raises(ConfigError, match="gradual_unfreeze"):
        _classifier(strategies="lora,gradual_unfreeze")
    with pytest.raises(ConfigError, match="decay must be in"):
        EMAWeightAveraging(decay=0.0)
    assert _classifier(ema_decay=None).configure_callbacks() == []


def test_lora_with_ema_and_mixup_averages_the_adapter_trained_on_mixed_batches():
    """The usual composition: LoRA, EMA and Mixup/CutMix in one run; the EMA is the hand average of what trained."""
    model = _classifier(strategies="lora", mixup=0.4, cutmix=1.0, lr=0.01)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    recorder = RecordTrained(_averaged_names(model))
    trainer = make_trainer(max_epochs=2, callbacks=[recorder])
    trainer.fit(model, _loader())
    assert model.mixer is not None and model.mixer.last_lam is not None  # batches were mixed
    assert sorted(_ema_callback(trainer).averaged_names) == sorted(recorder.names)
    final = model.state_dict()
    for name, value in _hand_ema(recorder.history, DECAY, warmup=False).items():
        torch.testing.assert_close(final[name].double(), value, atol=1e-6, rtol=1e-6)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
