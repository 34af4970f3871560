"""Mixup / CutMix in ImageClassifier: the mixed targets and images, the soft-target loss, the switch-off epoch, the
refused set-ups, a LoRA run that resumes, and the checks against hand computations."""

from __future__ import annotations

import inspect

import lightning.pytorch as pl
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from quiet_trainer import make_trainer
from torch.utils.data import DataLoader, TensorDataset

from cvft.errors import ConfigError, StrategyError
from cvft.tasks import ImageClassifier, MultiTaskClassifier, ObjectDetector
from cvft.tasks.feature_cache import check_cacheable
from cvft.tasks.mixing import BatchMixer, check_even_batch_size

NUM_CLASSES = 3


def smoothed_onehot(labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """timm's smoothed one-hot: ``off = smoothing / C`` everywhere, ``1 - smoothing + off`` on the label."""
    off = smoothing / NUM_CLASSES
    return torch.full((len(labels), NUM_CLASSES), off).scatter_(1, labels[:, None], 1.0 - smoothing + off)


def loader(n=8, batch_size=8, seed=0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % NUM_CLASSES
    images = torch.randn(n, 3, 32, 32, generator=generator) + targets[:, None, None, None].float()
    return DataLoader(TensorDataset(images, targets), batch_size=batch_size, shuffle=False)


def classifier(seed=0, **kwargs) -> ImageClassifier:
    torch.manual_seed(seed)
    kwargs.setdefault("backbone", "test_resnet")
    return ImageClassifier(pretrained=False, num_classes=NUM_CLASSES, warmup_epochs=0, **kwargs)


class StepRecorder(pl.Callback):
    """Per training step: the backbone's input and logits, the mixer's lambda, and the step's loss."""

    def __init__(self, model: ImageClassifier) -> None:
        self.steps: list[dict] = []
        self._pending: dict = {}
        model.backbone.register_forward_hook(self._record)

    def _record(self, module, inputs, output):
        if module.training:
            self._pending = {"images": inputs[0].detach().clone(), "logits": output.detach().clone()}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._batch = [t.clone() for t in batch]  # the mixer works in place, as timm's

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        lam = module.mixer.last_lam if module.mixer is not None else None
        self.steps.append({**self._pending, "loss": outputs["loss"].detach(), "epoch": trainer.current_epoch,
                           "lam": lam, "batch": self._batch})  # fmt: skip
        if module.mixer is not None:
            module.mixer.mixup.last_lam = None


# --------------------------------------------------------------------------- (1) targets, (3) CutMix boxes
@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixed_targets_sum_to_one_and_follow_the_drawn_lambda(mode, smoothing):
    mixer = BatchMixer(NUM_CLASSES, mixup=0.4, cutmix=1.0, mode=mode, label_smoothing=smoothing)
    labels = torch.tensor([0, 1, 2, 0, 1, 1])
    for seed in range(5):
        np.random.seed(seed)
        _, soft = mixer(torch.randn(6, 3, 16, 16), labels)
        lam = torch.as_tensor(mixer.last_lam, dtype=torch.float32).reshape(-1, 1)
        expected = lam * smoothed_onehot(labels, smoothing) + (1 - lam) * smoothed_onehot(labels.flip(0), smoothing)
        assert torch.allclose(soft.sum(-1), torch.ones(6))
        assert torch.allclose(soft, expected, atol=1e-6)


def test_mixup_blends_each_image_with_its_mirror_by_lambda():
    mixer = BatchMixer(NUM_CLASSES, mixup=0.4)
    images = torch.randn(4, 3, 8, 8)
    np.random.seed(3)
    mixed, _ = mixer(images.clone(), torch.tensor([0, 1, 2, 0]))
    lam = mixer.last_lam
    assert 0 < lam < 1
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.flip(0), atol=1e-6)


@pytest.mark.parametrize("minmax", [None, [0.3, 0.7]])
def test_cutmix_pastes_one_box_of_the_mirror_image_whose_area_is_one_minus_lambda(minmax):
    mixer = BatchMixer(NUM_CLASSES, cutmix=1.0, cutmix_minmax=minmax)
    images = torch.arange(1.0, 5.0)[:, None, None, None].expand(4, 3, 20, 24).clone()  # image i is filled with i+1
    for seed in range(8):
        np.random.seed(seed)
        mixed, soft = mixer(images.clone(), torch.tensor([0, 1, 2, 0]))
        lam = mixer.last_lam
        for i in range(4):
            pasted = mixed[i, 0] != images[i, 0]
            assert torch.all(mixed[i][:, pasted] == images.flip(0)[i][:, pasted])
            assert int(pasted.sum()) == round((1 - lam) * 20 * 24)  # timm corrects lambda to the clipped box
            assert (1 - lam) * 20 * 24 == pytest.approx(round((1 - lam) * 20 * 24), abs=1e-6)
            rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
            if len(rows):  # one rectangle: its bounding box is full
                assert pasted[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
        assert torch.allclose(soft[0], lam * torch.eye(3)[0] + (1 - lam) * torch.eye(3)[0])  # same label both sides
        assert torch.allclose(soft[1], lam * torch.eye(3)[1] + (1 - lam) * torch.eye(3)[2])


# --------------------------------------------------------------------------- (2) the loss, (4) the off epoch
def test_training_loss_is_soft_target_cross_entropy_of_the_mixed_batch_and_plain_ce_after_the_off_epoch():
    smoothing = 0.1
    model = classifier(mixup=0.8, cutmix=1.0, label_smoothing=smoothing, mix_off_epoch=1)
    recorder = StepRecorder(model)
    np.random.seed(0)
    make_trainer(2, callbacks=[recorder], limit_train_batches=1).fit(model, loader())
    mixed_step, plain_step = recorder.steps
    images, labels = mixed_step["batch"]
    lam = mixed_step["lam"]
    assert mixed_step["epoch"] == 0 and 0 < lam < 1
    assert not torch.allclose(mixed_step["images"], images)
    soft = lam * smoothed_onehot(labels, smoothing) + (1 - lam) * smoothed_onehot(labels.flip(0), smoothing)
    by_hand = (-soft * mixed_step["logits"].log_softmax(-1)).sum(-1).mean()
    assert mixed_step["loss"].item() == pytest.approx(by_hand.item(), rel=1e-5)  # smoothed once, not twice

    images, labels = plain_step["batch"]
    assert plain_step["epoch"] == 1 and plain_step["lam"] is None
    assert torch.equal(plain_step["images"], images)  # untouched
    plain = F.cross_entropy(plain_step["logits"], labels, label_smoothing=smoothing)
    assert plain_step["loss"].item() == pytest.approx(plain.item(), rel=1e-5)


def test_evaluation_is_untouched_and_train_accuracy_counts_the_dominant_label():
    model = classifier(mixup=0.8)
    recorder = StepRecorder(model)
    trainer = make_trainer(1, callbacks=[recorder], limit_train_batches=1, limit_val_batches=1)
    np.random.seed(1)
    trainer.fit(model, loader(), loader())
    step = recorder.steps[0]
    images, labels = step["batch"]
    dominant = labels if step["lam"] >= 0.5 else labels.flip(0)
    accuracy = (step["logits"].argmax(-1) == dominant).float().mean()
    assert trainer.callback_metrics["train/acc"].item() == pytest.approx(accuracy.item())
    with torch.no_grad():
        plain = F.cross_entropy(model.eval()(images), labels)  # validation saw the same, unmixed images
    assert trainer.callback_metrics["val/loss"].item() == pytest.approx(plain.item(), rel=1e-4)


def test_an_odd_last_batch_trains_on_all_but_its_last_image():
    model = classifier(mixup=0.4)
    recorder = StepRecorder(model)
    with pytest.warns(UserWarning, match="even batches"):
        make_trainer(1, callbacks=[recorder], limit_train_batches=2).fit(model, loader(n=11, batch_size=8))
    assert [len(step["images"]) for step in recorder.steps] == [8, 2]


# --------------------------------------------------------------------------- (5) refused set-ups
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"multi_label": True}, ConfigError, "multi_label=True is not supported.*mixup=0"),
        ({"loss": "focal"}, ConfigError, "loss='cross_entropy'"),
        ({"feature_cache": "memory"}, ConfigError, "feature_cache='auto' or 'off'"),
        ({"strategies": "supcon"}, StrategyError, "'supcon' trains on 2 augmented views.*leave 'supcon' out"),
        ({"mix_mode": "rows"}, ConfigError, "choose one of batch, pair, elem"),
        ({"cutmix_minmax": [0.8, 0.2]}, ConfigError, r"0 < min < max <= 1"),
        ({"mixup": -0.2}, ConfigError, "mixup must be >= 0"),
        ({"mix_prob": 1.5}, ConfigError, r"--model.mix_prob"),
        ({"mix_off_epoch": 0}, ConfigError, "Leave mix_off_epoch unset"),
    ],
)
def test_refused_set_ups_name_the_fix(kwargs, error, match):
    with pytest.raises(error, match=match):
        classifier(mixup=kwargs.pop("mixup", 0.2), **kwargs)


def test_a_per_sample_teacher_cache_is_refused_but_distillation_on_mixed_images_trains():
    teacher = timm.create_model("test_resnet", num_classes=NUM_CLASSES)
    cached = {"name": "distillation", "teacher": teacher, "cache_logits": True}
    with pytest.raises(StrategyError, match="cache_logits=false"):
        classifier(mixup=0.2, strategies=[cached])
    # the KD term compares student and teacher on the same mixed image (as DeiT trains with mixup and a teacher)
    model = classifier(mixup=0.8, strategies=["lora", {"name": "distillation", "teacher": teacher}])
    seen: list[torch.Tensor] = []
    teacher.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].clone()))
    recorder = StepRecorder(model)
    make_trainer(1, callbacks=[recorder], limit_train_batches=1).fit(model, loader())
    assert torch.equal(seen[0], recorder.steps[0]["images"])
    assert not torch.equal(seen[0], recorder.steps[0]["batch"][0])


def test_odd_data_module_batch_size_is_refused_and_other_tasks_take_no_mix_options():
    class Data:
        batch_size = 7

    with pytest.raises(ConfigError, match="--data.batch_size such as 8"):
        check_even_batch_size(Data())
    check_even_batch_size(object())  # a plain DataLoader fit has no batch_size to check
    for task in (MultiTaskClassifier, ObjectDetector):
        assert not {"mixup", "cutmix"} & set(inspect.signature(task).parameters)
    assert classifier().mixer is None  # off by default


def test_features_are_not_cached_while_mixing():
    decision = check_cacheable(classifier(mixup=0.2, strategies="linear_probe"), None)
    assert not decision.use and "mixup/cutmix" in decision.reason


# --------------------------------------------------------------------------- (6) a LoRA run resumes
def test_lora_with_mixup_trains_and_resumes_from_its_checkpoint(tmp_path):
    options = dict(backbone="test_vit", strategies="lora", mixup=0.2, cutmix=1.0, mix_off_epoch=2, lr=1e-2)
    model = classifier(**options)
    trainer = make_trainer(1, limit_train_batches=2)
    trainer.fit(model, loader(n=16))
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)

    restored = ImageClassifier.from_checkpoint(path)
    assert restored.mixer is not None and restored.mixer.off_epoch == 2
    assert restored.hparams.cutmix == 1.0 and restored.hparams.mixup == 0.2
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name

    resumed = classifier(**options)
    recorder = StepRecorder(resumed)
    make_trainer(3, callbacks=[recorder], limit_train_batches=2).fit(resumed, loader(n=16), ckpt_path=path)
    assert [step["epoch"] for step in recorder.steps] == [1, 1, 2, 2]
    assert [step["lam"] is not None for step in recorder.steps] == [True, True, False, False]
    assert all(torch.isfinite(step["loss"]) for step in recorder.steps)
