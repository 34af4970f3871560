from __future__ import annotations

import gc

import lightning as L
import pytest
import torch
from torch import nn

from cvft.data.image_folder import ImageFolderDataModule
from cvft.errors import CheckpointMismatchError, DatasetError, ImageLoadError

COUNTS = {"cat": 6, "dog": 5, "emu": 4}


def _module(root=None, **kwargs) -> ImageFolderDataModule:
    kwargs = {"image_size": 16, "batch_size": 4, "num_workers": 0, **kwargs}
    return ImageFolderDataModule(root, **kwargs)


def test_class_info_before_setup(make_class_folders):
    data = _module(make_class_folders(COUNTS), val_fraction=0.2)
    assert data.num_classes == 3
    assert data.class_names == ["cat", "dog", "emu"]
    assert data.class_counts == [5, 4, 3]  # one of each class held out for validation
    assert sum(data.class_counts) == len(data.samples("train"))
    assert data.hparams.batch_size == 4 and data.hparams.val_fraction == 0.2


def test_split_is_seeded_disjoint_and_stratified(make_class_folders):
    root = make_class_folders(COUNTS)
    data = _module(root, val_fraction=0.3, test_fraction=0.2, seed=1)
    train, val, test = (set(s.path for s in data.samples(split)) for split in ("train", "val", "test"))
    assert not train & val and not train & test and not val & test
    assert len(train | val | test) == sum(COUNTS.values())
    assert {s.target for s in data.samples("val")} == {0, 1, 2}
    again = _module(root, val_fraction=0.3, test_fraction=0.2, seed=1)
    assert again.samples("val") == data.samples("val")
    assert _module(root, val_fraction=0.3, test_fraction=0.2, seed=2).samples("val") != data.samples("val")


def test_batches_from_every_loader(make_class_folders, tmp_path, save_image):
    predict = tmp_path / "unlabelled"
    for i in range(5):
        save_image(predict / f"sub{i % 2}" / f"{i}.png", value=i)
    data = _module(make_class_folders(COUNTS), test_fraction=0.2, predict_root=str(predict))

    data.setup("fit")
    images, targets = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert targets.shape == (4,) and targets.dtype == torch.int64
    images, targets = next(iter(data.val_dataloader()))
    assert images.shape[1:] == (3, 16, 16) and targets.dtype == torch.int64
    data.setup("test")
    assert next(iter(data.test_dataloader()))[0].shape[1:] == (3, 16, 16)

    data.setup("predict")
    indices = torch.cat([batch[1] for batch in data.predict_dataloader()])
    assert indices.tolist() == list(range(5))
    assert [data.predict_files[i].name for i in indices] == ["0.png", "2.png", "4.png", "1.png", "3.png"]


def test_drop_last_only_when_train_set_exceeds_batch(make_class_folders, tmp_path):
    data = _module(make_class_folders(COUNTS), batch_size=4)
    data.setup("fit")
    assert data.train_dataloader().drop_last is True
    assert data.val_dataloader().drop_last is False
    data = _module(make_class_folders({"a": 2, "b": 2}, root=tmp_path / "small"), batch_size=8, val_fraction=0.0)
    data.setup("fit")
    assert data.train_dataloader().drop_last is False
    assert data.val_dataloader() == []


def test_loader_with_workers(make_class_folders):
    data = _module(make_class_folders(COUNTS), num_workers=1)
    loader = data.train_dataloader()
    assert loader.persistent_workers and loader.num_workers == 1
    shapes = [images.shape for images, _ in loader]  # a whole epoch, so the idle worker shuts down promptly
    assert shapes == [(4, 3, 16, 16)] * 3
    del loader
    gc.collect()


def test_multi_label_csv(tmp_path, save_image):
    rows = ["path,label"]
    for i in range(12):
        save_image(tmp_path / "img" / f"{i}.png", value=i)
        rows.append(f"img/{i}.png,{['sky', 'sky|sea', 'sea|sand|sky'][i % 3]}")
    (tmp_path / "labels.csv").write_text("\n".join(rows))
    data = _module(csv=str(tmp_path / "labels.csv"), multi_label=True, batch_size=3)
    assert data.class_names == ["sand", "sea", "sky"]
    assert sum(data.class_counts) == sum(len(s.target) for s in data.samples("train"))
    data.setup("fit")
    _, targets = next(iter(data.val_dataloader()))
    assert targets.dtype == torch.float32 and targets.shape[1] == 3
    assert set(targets.unique().tolist()) <= {0.0, 1.0} and (targets.sum(1) >= 1).all()


def test_csv_with_val_csv(tmp_path, save_image):
    for i in range(6):
        save_image(tmp_path / f"{i}.png", value=i)
    (tmp_path / "train.csv").write_text("path,label\n0.png,a\n1.png,a\n2.png,b\n3.png,b\n")
    (tmp_path / "val.csv").write_text("path,label\n4.png,b\n5.png,b\n")
    data = _module(csv=str(tmp_path / "train.csv"), val_csv=str(tmp_path / "val.csv"))
    assert len(data.samples("train")) == 4 and [s.target for s in data.samples("val")] == [1, 1]
    (tmp_path / "bad_val.csv").write_text("path,label\n4.png,zebra\n")
    with pytest.raises(DatasetError, match="zebra"):
        _ = _module(csv=str(tmp_path / "train.csv"), val_csv=str(tmp_path / "bad_val.csv")).num_classes


def test_train_val_test_folders(tmp_path, make_class_folders):
    make_class_folders({"cat": 3, "dog": 3}, root=tmp_path / "train")
    make_class_folders({"cat": 1, "dog": 1}, root=tmp_path / "val")
    data = _module(tmp_path, test_fraction=0.3)
    assert len(data.samples("val")) == 2 and len(data.samples("test")) == 2 and len(data.samples("train")) == 4
    make_class_folders({"zebra": 1}, root=tmp_path / "val")
    with pytest.raises(DatasetError, match="zebra"):
        _ = _module(tmp_path).class_names


def test_check_images_reports_all_bad_files(make_class_folders):
    root = make_class_folders(COUNTS)
    for name in ("cat/000.png", "dog/001.png", "emu/002.png"):
        (root / name).write_bytes(b"garbage")
    with pytest.raises(ImageLoadError) as info:
        _ = _module(root).num_classes
    message = str(info.value)
    assert "3 of 15" in message and "Re-export or delete" in message
    for name in ("000.png", "001.png", "002.png"):
        assert name in message
    assert _module(root, check_images="none").num_classes == 3


def test_check_images_full_finds_truncated(make_class_folders):
    root = make_class_folders({"a": 2, "b": 2})
    data = (root / "a" / "000.png").read_bytes()
    (root / "a" / "000.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="000.png"):
        _ = _module(root, check_images="full").num_classes


def test_missing_or_empty_data(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        _ = _module(tmp_path / "nope").num_classes
    with pytest.raises(DatasetError, match="no class folders"):
        _ = _module(tmp_path).num_classes
    with pytest.raises(DatasetError, match="No labelled data"):
        _ = _module().num_classes
    with pytest.raises(DatasetError, match="predict_root"):
        _ = _module().predict_files


def test_no_test_split(make_class_folders):
    data = _module(make_class_folders(COUNTS))
    with pytest.raises(DatasetError, match="no test split"):
        data.test_dataloader()


def test_data_config_from_backbone(make_class_folders):
    root = make_class_folders({"a": 2, "b": 2})
    data = ImageFolderDataModule(root, backbone="test_vit", num_workers=0)
    assert data.image_size == 160 and data.mean == (0.5, 0.5, 0.5) and data.crop_pct == 0.95
    data = ImageFolderDataModule(root, backbone="test_vit", image_size=32, mean=(0.1, 0.2, 0.3), num_workers=0)
    assert data.image_size == 32 and data.mean == (0.1, 0.2, 0.3) and data.data_config["input_size"] == (3, 32, 32)
    data = ImageFolderDataModule(root, num_workers=0)
    assert data.image_size == 224 and data.mean == pytest.approx((0.485, 0.456, 0.406))


def test_grayscale(make_class_folders):
    data = _module(make_class_folders({"a": 3, "b": 3}), channels=1, mean=(0.3, 0.6, 0.9))
    assert data.mean == pytest.approx((0.6,))
    data.setup("fit")
    assert next(iter(data.train_dataloader()))[0].shape == (4, 1, 16, 16)


def test_bad_options(make_class_folders):
    with pytest.raises(ValueError, match="augment"):
        _module(augment="wild")
    with pytest.raises(ValueError, match="check_images"):
        _module(check_images="some")
    with pytest.raises(DatasetError, match="fraction"):
        _module(val_fraction=0.7, test_fraction=0.3)
    with pytest.raises(DatasetError, match="CSV"):
        _module(make_class_folders({"a": 1}), multi_label=True)


def test_state_dict_records_classes(make_class_folders, tmp_path):
    data = _module(make_class_folders(COUNTS))
    state = data.state_dict()
    assert state == {"class_names": ["cat", "dog", "emu"]}
    data.load_state_dict(state)
    with pytest.raises(CheckpointMismatchError, match="emu"):
        data.load_state_dict({"class_names": ["cat", "dog"]})


def test_digits_demo_and_lightning_fit(digits_root):
    data = _module(digits_root, image_size=32, augment="light", batch_size=16, val_fraction=0.0)
    assert data.class_names == [str(d) for d in range(10)]

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))

        def training_step(self, batch, _):
            images, targets = batch
            return nn.functional.cross_entropy(self.net(images), targets)

        def validation_step(self, batch, _):
            raise AssertionError("there is no validation split")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(Tiny(), datamodule=data)  # no validation split: validation is skipped
    assert trainer.global_step == 3  # 60 images, batch 16, last partial batch dropped


def test_cli_can_read_the_signature():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(ImageFolderDataModule, "data")
    config = parser.parse_args(["--data.root", "x", "--data.mean", "[0.5, 0.5, 0.5]", "--data.augment", "light"])
    assert config.data.root == "x" and tuple(config.data.mean) == (0.5, 0.5, 0.5)
    help_text = parser.format_help()
    assert "Share of each class held out for validation" in help_text


def test_given_class_names(make_class_folders, tmp_path, save_image):
    save_image(tmp_path / "new" / "x.png")
    data = _module(class_names=["b", "a"], predict_root=str(tmp_path / "new"))  # predicting with a checkpoint's classes
    assert data.num_classes == 2 and data.class_names == ["b", "a"] and data.state_dict() == {"class_names": ["b", "a"]}
    assert len(data.predict_files) == 1
    assert "class_names" not in data.hparams  # the model records them; equal keys must not differ in value

    root = make_class_folders({"cat": 2, "dog": 2})
    data = _module(root, class_names=["dog", "cat", "emu"], val_fraction=0.0)
    assert data.class_names == ["dog", "cat", "emu"]
    assert [s.target for s in data.samples("train")] == [1, 1, 0, 0] and data.class_counts == [2, 2, 0]
    with pytest.raises(DatasetError, match="cat"):
        _ = _module(root, class_names=["dog"]).samples("train")
    with pytest.raises(DatasetError, match="duplicates"):
        _module(root, class_names=["dog", "dog"])
