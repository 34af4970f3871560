"""Focal loss against a hand-written reference, and ImageClassifier(loss="focal") through a Trainer."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from quiet_trainer import make_trainer
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from cvft.errors import CvftError
from cvft.tasks import ImageClassifier
from cvft.tasks.losses import focal_loss


def reference_softmax_focal(logits, targets, gamma, alpha=None):
    total = 0.0
    for row, target in zip(logits.tolist(), targets.tolist(), strict=True):
        exps = [math.exp(v) for v in row]
        p = exps[target] / sum(exps)
        weight = alpha[target] if alpha is not None else 1.0
        total += -weight * (1 - p) ** gamma * math.log(p)
    return total / len(targets)


def reference_sigmoid_focal(logits, targets, gamma, alpha=None, pos_weight=None):
    total, count = 0.0, 0
    for row, target_row in zip(logits.tolist(), targets.tolist(), strict=True):
        for c, (x, y) in enumerate(zip(row, target_row, strict=True)):
            p = 1 / (1 + math.exp(-x))
            a = 1.0 if alpha is None else alpha
            if y:
                pw = 1.0 if pos_weight is None else pos_weight[c]
                total += -pw * a * (1 - p) ** gamma * math.log(p)
            else:
                total += -(1 - a if alpha is not None else 1.0) * p**gamma * math.log(1 - p)
            count += 1
    return total / count


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=generator, dtype=torch.float64) * 2
    return logits, torch.tensor([0, 1, 2, 3, 1, 0]), (torch.rand(6, 4, generator=generator) > 0.6).double()


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.5])
def test_softmax_focal_matches_reference(batch, gamma):
    logits, targets, _ = batch
    alpha = [0.1, 0.2, 0.3, 0.4]
    assert focal_loss(logits, targets, gamma).item() == pytest.approx(reference_softmax_focal(logits, targets, gamma))
    got = focal_loss(logits, targets, gamma, alpha=alpha).item()
    assert got == pytest.approx(reference_softmax_focal(logits, targets, gamma, alpha))


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
def test_sigmoid_focal_matches_reference(batch, gamma):
    logits, _, multi = batch
    pos_weight = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    got = focal_loss(logits, multi, gamma, alpha=0.25, multi_label=True, pos_weight=pos_weight).item()
    assert got == pytest.approx(reference_sigmoid_focal(logits, multi, gamma, 0.25, pos_weight.tolist()))
    got = focal_loss(logits, multi, gamma, multi_label=True).item()
    assert got == pytest.approx(reference_sigmoid_focal(logits, multi, gamma))


def test_gamma_zero_is_cross_entropy_and_bce(batch):
    logits, targets, multi = batch
    assert torch.allclose(focal_loss(logits, targets, gamma=0.0), F.cross_entropy(logits, targets))
    pos_weight = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    bce = F.binary_cross_entropy_with_logits(logits, multi, pos_weight=pos_weight)
    assert torch.allclose(focal_loss(logits, multi, 0.0, multi_label=True, pos_weight=pos_weight), bce)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_gradients_stay_finite_for_extreme_logits(gamma):
    logits = torch.tensor([[80.0, -80.0, 0.0], [-1e4, 1e4, 0.0]], requires_grad=True)
    for loss in (
        focal_loss(logits, torch.tensor([0, 1]), gamma),
        focal_loss(logits, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), gamma, multi_label=True),
    ):
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_focal_down_weights_easy_examples():
    easy, hard = torch.tensor([[4.0, 0.0]]), torch.tensor([[0.2, 0.0]])
    target = torch.tensor([0])
    ratio_easy = focal_loss(easy, target) / F.cross_entropy(easy, target)
    ratio_hard = focal_loss(hard, target) / F.cross_entropy(hard, target)
    assert ratio_easy < 0.01 < ratio_hard


def test_bad_options_are_refused():
    logits, targets = torch.zeros(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="one weight per class"):
        focal_loss(logits, targets, alpha=0.25)
    with pytest.raises(ValueError, match="one value per class"):
        focal_loss(logits, targets, alpha=[1.0, 2.0])
    with pytest.raises(ValueError, match=">= 0"):
        focal_loss(logits, targets, gamma=-1.0)
    with pytest.raises(CvftError, match="Unknown loss"):
        ImageClassifier("test_resnet", pretrained=False, num_classes=3, loss="dice")
    with pytest.raises(CvftError, match="label_smoothing"):
        ImageClassifier("test_resnet", pretrained=False, num_classes=3, loss="focal", label_smoothing=0.1)
    with pytest.raises(CvftError, match="one weight per class"):
        ImageClassifier("test_resnet", pretrained=False, num_classes=3, loss="focal", focal_alpha=0.25)


@pytest.mark.parametrize("multi_label", [False, True])
def test_classifier_loss_dispatches_to_focal(multi_label):
    images = torch.randn(4, 3, 32, 32)
    targets = (torch.rand(4, 3) > 0.5).float() if multi_label else torch.randint(0, 3, (4,))
    kwargs = {"focal_alpha": 0.25, "pos_weight": [1.0, 2.0, 3.0]} if multi_label else {"focal_alpha": [1.0, 2.0, 1.0]}
    model = ImageClassifier(
        "test_resnet", pretrained=False, num_classes=3, multi_label=multi_label, loss="focal", focal_gamma=1.5, **kwargs
    )
    logits = model(images)
    pos_weight = model.pos_weight if multi_label else None
    expected = focal_loss(logits, targets, 1.5, kwargs["focal_alpha"], multi_label, pos_weight=pos_weight)
    assert torch.allclose(model.loss(logits, targets), expected)
    plain = ImageClassifier("test_resnet", pretrained=False, num_classes=3, multi_label=multi_label)
    assert not torch.allclose(plain.loss(logits, targets), expected)


def test_classifier_trains_with_focal_loss_and_reloads(tmp_path):
    L.seed_everything(0)
    images, targets = torch.randn(8, 3, 32, 32), (torch.rand(8, 3) > 0.5).float()
    model = ImageClassifier(
        "test_resnet",
        pretrained=False,
        num_classes=3,
        multi_label=True,
        loss="focal",
        focal_gamma=1.5,
        focal_alpha=[0.25, 0.5, 0.75],
        pos_weight=[1.0, 2.0, 3.0],
        warmup_epochs=0,
    )
    before = [p.detach().clone() for p in model.parameters()]
    trainer = make_trainer(None, max_steps=2, default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(TensorDataset(images, targets), batch_size=4))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    path = tmp_path / "focal.ckpt"
    trainer.save_checkpoint(path)
    reloaded = ImageClassifier.from_checkpoint(path).eval()
    assert reloaded.hparams.loss == "focal" and reloaded.hparams.focal_alpha == [0.25, 0.5, 0.75]
    model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(images), model(images))
        assert torch.allclose(reloaded.loss(reloaded(images), targets), model.loss(model(images), targets))
