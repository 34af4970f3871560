"""Cached backbone features (cvft.tasks.feature_cache): same training as on images, reuse, invalidation, refusal."""

from __future__ import annotations

import json
import logging
import os
import struct

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

import cvft.data.dataset as dataset_module
from cvft.data import ImageFolderDataModule
from cvft.data.dataset import ImageDataset
from cvft.errors import ConfigError
from cvft.tasks import ImageClassifier
from cvft.tasks.feature_cache import FeatureDataset, FeatureStore, check_cacheable

CLASSES = 3


def write_images(root, per_class=8, size=36, seed=0):
    rng = np.random.default_rng(seed)
    for label in range(CLASSES):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3)) // 2 + 40 * label
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture
def image_root(tmp_path):
    return write_images(tmp_path / "images")


def make_data(root, **kwargs):
    options = dict(image_size=32, batch_size=4, num_workers=0, augment="none", val_fraction=0.25, check_images="none")
    options.update(kwargs)
    return ImageFolderDataModule(str(root), **options)


def make_model(backbone="test_resnet", strategies="linear_probe", seed=0, **kwargs):
    torch.manual_seed(seed)
    return ImageClassifier(backbone, pretrained=False, num_classes=CLASSES, strategies=strategies, lr=0.05, **kwargs)


def fit(model, data, epochs=3, seed=0):
    pl.seed_everything(seed, workers=True)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True, num_sanity_val_steps=1,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    return trainer


def metrics(trainer):
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


class Counter:
    """Wraps a callable and counts calls and images (first argument's batch size)."""

    def __init__(self, function):
        self.function, self.calls, self.items = function, 0, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.items += len(args[0]) if hasattr(args[0], "__len__") and not isinstance(args[0], (str, os.PathLike)) else 1
        return self.function(*args, **kwargs)


# --------------------------------------------------------------------------- (1) the same training
@pytest.mark.parametrize(
    ("backbone", "strategies", "kwargs"),
    [
        ("test_resnet", "linear_probe", {}),
        ("test_vit", "classifier_only", {}),
        ("test_resnet", "linear_probe", {"backbone_kwargs": {"drop_rate": 0.3}}),  # head dropout replayed
        ("test_vit", "linear_probe", {"backbone_kwargs": {"drop_rate": 0.3}}),  # nn.Dropout head_drop
    ],
    ids=["resnet-linear_probe", "vit-classifier_only", "resnet-head-dropout", "vit-head-dropout"],
)
def test_cached_fit_matches_image_fit(image_root, backbone, strategies, kwargs):
    images = make_model(backbone, strategies, feature_cache="off", **kwargs)
    images_trainer = fit(images, make_data(image_root))
    cached = make_model(backbone, strategies, feature_cache="memory", **kwargs)
    cached_trainer = fit(cached, make_data(image_root))

    assert images.feature_cache is None and isinstance(images_trainer.train_dataloader.dataset, ImageDataset)
    assert cached.feature_cache is not None and cached.feature_cache.computed == ["train", "val"]
    assert isinstance(cached_trainer.train_dataloader.dataset, FeatureDataset)  # the epochs trained on features
    expected, got = metrics(images_trainer), metrics(cached_trainer)
    assert set(expected) == set(got) and "val/acc" in got and "train/loss_epoch" in got
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-4), name
    head, cached_head = images.backbone.get_classifier(), cached.backbone.get_classifier()
    torch.testing.assert_close(cached_head.weight, head.weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached_head.bias, head.bias, atol=1e-5, rtol=0)
    assert not torch.equal(
        cached_head.weight, make_model(backbone, strategies, **kwargs).backbone.get_classifier().weight
    )


def test_after_a_cached_fit_images_give_the_cached_metrics_and_checkpoints_keep_their_form(image_root, tmp_path):
    data = make_data(image_root)
    model = make_model(feature_cache="memory")
    trainer = fit(model, data, epochs=2)
    cached_val = metrics(trainer)["val/acc"]
    assert not any(type(d).__name__ == "FeatureDataset" for d in data.datasets.values())  # images are back
    validated = trainer.validate(model, datamodule=data, verbose=False)[0]
    assert validated["val/acc"] == pytest.approx(cached_val, abs=1e-4)
    trainer.save_checkpoint(tmp_path / "cached.ckpt")
    reloaded = ImageClassifier.from_checkpoint(tmp_path / "cached.ckpt")
    assert set(reloaded.state_dict()) == set(make_model(feature_cache="off").state_dict())
    torch.testing.assert_close(reloaded.backbone.fc.weight, model.backbone.fc.weight)


# --------------------------------------------------------------------------- (2) reuse and invalidation
def test_disk_cache_is_reused_without_decoding_or_running_the_backbone(image_root, monkeypatch):
    first = make_model(feature_cache="disk")
    fit(first, make_data(image_root), epochs=1)
    assert first.feature_cache.computed == ["train", "val"]
    assert set(first.feature_cache.files) == {"train", "val"}

    decodes = Counter(dataset_module.load_image)
    monkeypatch.setattr(dataset_module, "load_image", decodes)
    second = make_model(feature_cache="disk")
    forwards = Counter(second.backbone.forward_features)
    monkeypatch.setattr(second.backbone, "forward_features", forwards)
    fit(second, make_data(image_root), epochs=2)

    assert second.feature_cache.computed == []
    assert decodes.calls == 0  # no image decoded in the whole second fit
    assert forwards.calls == 3 and forwards.items == 6  # the eligibility probe only: 2 random inputs, 3 passes


@pytest.mark.parametrize("change", ["file_list", "weights", "transform", "file_content"])
def test_disk_cache_is_invalidated_by_files_weights_and_transform(image_root, change):
    fit(make_model(feature_cache="disk"), make_data(image_root), epochs=1)
    seed, data_options = 0, {}
    if change == "file_list":
        write_images(image_root, per_class=9, seed=0)  # one more image per class, the others unchanged
    elif change == "weights":
        seed = 1
    elif change == "transform":
        data_options = {"image_size": 28}
    else:
        target = image_root / "class0" / "0.png"
        Image.new("RGB", (36, 36), (255, 0, 0)).save(target)
        os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    again = make_model(feature_cache="disk", seed=seed)
    fit(again, make_data(image_root, **data_options), epochs=1)
    assert "train" in again.feature_cache.computed


def test_memory_cache_is_reused_across_fits_in_one_process(image_root):
    fit(make_model(feature_cache="memory"), make_data(image_root), epochs=1)
    second = make_model(feature_cache="memory")
    fit(second, make_data(image_root), epochs=1)
    assert second.feature_cache.computed == []


# --------------------------------------------------------------------------- (3) refused, with the reason
@pytest.mark.parametrize(
    ("model_kwargs", "data_kwargs", "reason"),
    [
        ({}, {"augment": "light"}, "augment='light'"),
        ({"strategies": None}, {}, "full fine-tuning"),
        ({"strategies": "bitfit"}, {}, "strategies=bitfit"),
        ({"strategies": [{"name": "linear_probe", "train_bn": True}]}, {}, "train_bn=True"),
        ({"backbone": "test_vit", "drop_path_rate": 0.2}, {}, "random in training mode"),
    ],
    ids=["augmentation", "full", "bitfit", "train_bn", "drop_path"],
)
def test_auto_does_not_cache_and_says_why(image_root, caplog, model_kwargs, data_kwargs, reason):
    data = make_data(image_root, **data_kwargs)
    model = make_model(**{"feature_cache": "auto", **model_kwargs})
    data.setup("fit")
    decision = check_cacheable(model, data)
    assert not decision.use and reason in decision.reason
    with caplog.at_level(logging.INFO, logger="cvft.tasks.feature_cache"):
        fit(model, data, epochs=1)
    assert model.feature_cache is None
    assert any("Feature cache off" in r.message and reason in r.message for r in caplog.records)


def test_auto_caches_and_says_why(image_root, caplog):
    with caplog.at_level(logging.INFO, logger="cvft.tasks.feature_cache"):
        fit(make_model(), make_data(image_root), epochs=1)  # feature_cache defaults to auto
    assert any("Feature cache on (disk" in r.message and "linear_probe" in r.message for r in caplog.records)


def test_explicit_cache_mode_refuses_a_fit_whose_features_change(image_root):
    with pytest.raises(ConfigError, match=r"feature_cache='memory' cannot be used: augment='default'"):
        fit(make_model(feature_cache="memory"), make_data(image_root, augment="default"), epochs=1)
    with pytest.raises(ConfigError, match="Unknown feature_cache 'yes'"):
        make_model(feature_cache="yes")


def test_fits_on_plain_dataloaders_are_unaffected(image_root, caplog):
    data = make_data(image_root)
    data.setup("fit")
    model = make_model()
    with caplog.at_level(logging.INFO, logger="cvft.tasks.feature_cache"):
        pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False).fit(model, data.train_dataloader())  # fmt: skip
    assert model.feature_cache is None
    assert any("does not come from a cvft DataModule" in r.message for r in caplog.records)


# --------------------------------------------------------------------------- (4) safe files
def test_disk_entries_are_safetensors_written_atomically(image_root, tmp_path, monkeypatch):
    model = make_model(feature_cache="disk")
    fit(model, make_data(image_root), epochs=1)
    for path in model.feature_cache.files.values():
        raw = path.read_bytes()
        assert raw[:1] != b"\x80"  # not a pickle (protocol 2+ starts with 0x80), not a torch zip either
        (header_size,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + header_size])
        assert header["__metadata__"]["format"] == "cvft-features-v1"
        assert set(header) == {"__metadata__", "features", "targets"}
    assert not list(path.parent.glob("*.tmp"))

    store = FeatureStore("disk", tmp_path / "store")
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        store.save("k" * 64, "label", torch.zeros(2, 3), torch.zeros(2))
    assert list((tmp_path / "store").iterdir()) == []  # neither a half-written entry nor the temporary file
    monkeypatch.undo()
    store.save("k" * 64, "label", torch.ones(2, 3), torch.arange(2))
    features, targets = store.load("k" * 64, "label")
    assert torch.equal(features, torch.ones(2, 3)) and torch.equal(targets, torch.arange(2))
    assert store.load("j" * 64, "label") is None
    store.path("k" * 64, "label").write_bytes(b"garbage")
    assert store.load("k" * 64, "label") is None  # a damaged entry is a miss, not an error


def test_callbacks_at_fit_end_get_images_back(image_root):
    """A report that runs the model over validation batches at fit end (MedicalReport) sees images, not features."""
    seen = []

    class ValidationAtFitEnd(pl.Callback):
        def on_fit_end(self, trainer, pl_module):
            seen.extend(type(batch).__name__ for batch in trainer.datamodule.val_dataloader())

    model = make_model()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[ValidationAtFitEnd()],
    )  # fmt: skip
    trainer.fit(model, datamodule=make_data(image_root))
    assert model.feature_cache is not None, "the fit must have used cached features"
    assert seen and all(name in ("list", "tuple") for name in seen), seen
