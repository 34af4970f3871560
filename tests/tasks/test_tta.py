"""Test-time augmentation (``tta``): a flip-invariant model predicts the same with and without it, every mode equals
the hand-averaged probabilities of its views, training and validation never see it, and bad values are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from quiet_trainer import make_trainer
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms.functional import five_crop

from cvft.data import ImageFolderDataModule
from cvft.errors import ConfigError
from cvft.tasks import ImageClassifier


def _images(n: int = 8, seed: int = 0, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % 3
    return torch.randn(n, 3, size, size, generator=generator) + 0.5 * targets[:, None, None, None], targets


def _classifier(**kwargs) -> ImageClassifier:
    torch.manual_seed(0)
    options = dict(pretrained=False, num_classes=3, lr=0.02, warmup_epochs=0.0)
    return ImageClassifier(kwargs.pop("backbone", "test_resnet"), **{**options, **kwargs}).eval()


def _predict(model: ImageClassifier, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.predict_step((images, torch.arange(len(images))), 0)["probs"]


def _plain(model: ImageClassifier, views: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model.backbone(view) for view in views]


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
def test_flip_tta_on_a_flip_invariant_model_equals_the_plain_prediction(backbone):
    images = _images()[0]
    plain, flipped = _classifier(backbone=backbone), _classifier(backbone=backbone, tta="flip")
    for model in (plain, flipped):  # symmetrise the forward: f(x) = g(x) + g(mirror(x)), so f(mirror(x)) = f(x)
        backbone_forward = model.backbone

        def symmetric(x: torch.Tensor, g=backbone_forward) -> torch.Tensor:
            return g(x) + g(x.flip(-1))

        model.forward = symmetric
    torch.testing.assert_close(_predict(flipped, images), _predict(plain, images), atol=1e-6, rtol=0)
    # and on the unsymmetrised model flip TTA does change the prediction
    assert not torch.allclose(_predict(_classifier(backbone=backbone, tta="flip"), images), _predict(plain, images))


@pytest.mark.parametrize("multi_label", [False, True])
def test_each_mode_averages_the_probabilities_of_its_views(multi_label):
    images = _images(4, seed=1)[0]
    crop_pct = 0.8  # 32 px -> 40 px, five 32 px crops (torchvision's five_crop, an independent implementation)
    crops = list(five_crop(F.interpolate(images, size=(40, 40), mode="bilinear", align_corners=False), [32, 32]))
    expected_views = {
        "none": [images],
        "flip": [images, images.flip(-1)],
        "crops": crops,
        "flip_crops": crops + [crop.flip(-1) for crop in crops],
    }
    for mode, views in expected_views.items():
        model = _classifier(tta=mode, tta_crop_pct=crop_pct, multi_label=multi_label)
        model.temperature.fill_(1.7)
        logits = [view_logits / 1.7 for view_logits in _plain(model, views)]
        probabilities = [z.sigmoid() if multi_label else z.softmax(-1) for z in logits]
        hand = torch.stack(probabilities).mean(0)
        torch.testing.assert_close(_predict(model, images), hand, atol=1e-6, rtol=0, msg=mode)


def test_test_step_scores_the_averaged_probabilities():
    images, targets = _images(6, seed=2)
    model = _classifier(tta="flip")
    result = make_trainer().test(model, DataLoader(TensorDataset(images, targets), batch_size=6))[0]
    probs = torch.stack([z.softmax(-1) for z in _plain(model, [images, images.flip(-1)])]).mean(0)
    nll = -probs.log().gather(1, targets[:, None]).mean()
    assert result["test/loss"] == pytest.approx(float(nll), rel=1e-5)
    assert result["test/acc"] == pytest.approx(float((probs.argmax(-1) == targets).float().mean()))


def test_tta_changes_nothing_in_training_and_validation():
    images, targets = _images(16)
    runs = {}
    for mode in ("none", "flip_crops"):
        model = _classifier(tta=mode, strategies="lora", temperature_scaling=True)
        trainer = make_trainer(max_epochs=2)
        loader = DataLoader(TensorDataset(images, targets), batch_size=8)
        trainer.fit(model, loader, DataLoader(TensorDataset(images[:8], targets[:8]), batch_size=8))
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
        runs[mode] = (model.state_dict(), logged, trainer.test(model, loader)[0]["test/loss"])
    (state, logged, test_loss), (state_tta, logged_tta, test_loss_tta) = runs["none"], runs["flip_crops"]
    assert state.keys() == state_tta.keys() and all(torch.equal(state[k], state_tta[k]) for k in state)
    assert logged == logged_tta and "val/temperature" in logged
    assert test_loss != test_loss_tta  # the test does use it


def test_tta_runs_on_images_after_a_feature_cached_fit(tmp_path):
    root = tmp_path / "images"
    for label, kind in enumerate(("dark", "bright")):
        (root / kind).mkdir(parents=True)
        for i in range(6):
            pixels = np.random.default_rng(i).integers(0, 128, (36, 36, 3)) + 100 * label
            Image.fromarray(pixels.astype(np.uint8)).save(root / kind / f"{i}.png")
    data = ImageFolderDataModule(
        str(root), image_size=32, batch_size=4, num_workers=0, augment="none", val_fraction=0.25,
        check_images="none", predict_root=str(root),
    )  # fmt: skip
    model = _classifier(num_classes=2, strategies="linear_probe", feature_cache="memory", tta="flip")
    trainer = make_trainer(max_epochs=1)
    trainer.fit(model, datamodule=data)
    assert model.feature_cache is not None  # the head trained on cached features
    probs = torch.cat([out["probs"] for out in trainer.predict(model, datamodule=data)])
    images = torch.cat([batch[0] for batch in data.predict_dataloader()])
    hand = torch.stack([z.softmax(-1) for z in _plain(model.eval(), [images, images.flip(-1)])]).mean(0)
    torch.testing.assert_close(probs, hand, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="cached features"):
        model.test_step({"features": torch.randn(2, model.backbone.num_features), "target": torch.tensor([0, 1])}, 0)


@pytest.mark.parametrize(
    ("options", "match"),
    [({"tta": "rotate"}, "Unknown tta 'rotate'"), ({"tta_crop_pct": 0.0}, "tta_crop_pct"), ({"tta_crop_pct": 1.5}, "")],
)
def test_bad_tta_options_are_refused(options, match):
    with pytest.raises(ConfigError, match=match):
        _classifier(**options)
