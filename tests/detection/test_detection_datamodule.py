from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cvft.data.detection import DetectionDataModule, DetectionDataset, build_detection_transforms, read_coco
from cvft.errors import CheckpointMismatchError, DatasetError


def _data(shapes_root, **kwargs) -> DetectionDataModule:
    options = {"coco_json": shapes_root / "annotations.json", "image_size": 64, "batch_size": 4, "num_workers": 0}
    return DetectionDataModule(**{**options, **kwargs})


def _assert_contract_batch(batch, image_size: int, num_classes: int) -> None:
    images, targets = batch
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets)
    for image, target in zip(images, targets, strict=True):
        assert image.dtype == torch.float32 and image.shape == (3, image_size, image_size)
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
        assert set(target) == {"boxes", "labels", "image_id"}
        boxes, labels = target["boxes"], target["labels"]
        assert boxes.dtype == torch.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
        assert labels.dtype == torch.int64 and labels.shape == (len(boxes),)
        assert target["image_id"].dtype == torch.int64 and target["image_id"].ndim == 0
        assert ((labels >= 0) & (labels < num_classes)).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all() and (boxes >= 0).all() and (boxes <= image_size).all()


def test_classes_are_known_right_after_construction(shapes_root):
    data = _data(shapes_root)
    assert data.num_classes == 3
    assert data.class_names == ["circle", "square", "triangle"]
    assert data.category_ids == [3, 7, 11]
    assert not data.datasets  # nothing built yet


def test_train_and_val_batches_follow_the_contract_including_empty_images(shapes_root):
    data = _data(shapes_root)
    data.setup("fit")
    train_batches = list(data.train_dataloader())  # a whole epoch: empty images and crops included
    assert len(train_batches) == 51 // 4
    for batch in train_batches:
        _assert_contract_batch(batch, 64, 3)
    val_batches = list(data.val_dataloader())
    for batch in val_batches:
        _assert_contract_batch(batch, 64, 3)
    val_targets = [t for _, targets in val_batches for t in targets]
    assert len(val_targets) == 13
    ids = {int(t["image_id"]) for t in val_targets}
    expected = {r.image_id: r for r in data.records("val")}
    assert ids == set(expected)
    for target in val_targets:  # eval letterbox: 96 px wide images -> 64 px, boxes scaled by 2/3, no offset
        record = expected[int(target["image_id"])]
        np.testing.assert_allclose(target["boxes"].numpy(), record.boxes * (64 / 96), atol=1e-3)


def test_images_without_boxes_give_empty_targets(shapes_root):
    empty = [r for r in read_coco(shapes_root / "annotations.json").records if len(r.boxes) == 0]
    assert empty
    for train in (True, False):
        dataset = DetectionDataset(empty, build_detection_transforms(64, train=train, seed=0))
        image, target = dataset[0]
        assert image.shape == (3, 64, 64)
        assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
        assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64


def test_seeded_split_is_reproducible_and_by_image(shapes_root):
    def val_paths(seed):
        return [r.path for r in _data(shapes_root, seed=seed).records("val")]

    first, again, other = val_paths(0), val_paths(0), val_paths(1)
    assert first == again and first != other and len(first) == 13
    data = _data(shapes_root)
    train = [r.path for r in data.records("train")]
    assert not set(train) & set(first) and len(train) + len(first) == 64
    assert _data(shapes_root, val_fraction=0.0).records("val") == []


def test_data_yaml_and_yolo_root_read_the_listed_splits(shapes_root):
    for data in (DetectionDataModule(data_yaml=shapes_root / "data.yaml"), DetectionDataModule(yolo_root=shapes_root)):
        assert data.class_names == ["circle", "square", "triangle"]
        assert data.category_ids == [0, 1, 2]
        listed = (shapes_root / "val.txt").read_text().split()
        assert [r.path.name for r in data.records("val")] == [p.rsplit("/", 1)[-1] for p in listed]
        assert len(data.records("train")) == 64 - len(listed)


def test_class_mismatch_between_train_and_val_is_refused(shapes_root, tmp_path):
    coco = json.loads((shapes_root / "annotations.json").read_text())
    coco["categories"][0]["name"] = "ellipse"
    (tmp_path / "val.json").write_text(json.dumps(coco))
    data = _data(shapes_root, val_coco_json=tmp_path / "val.json", val_image_root=shapes_root / "images")
    with pytest.raises(DatasetError, match="differ from the training classes"):
        data.setup("fit")
    same = _data(shapes_root, val_coco_json=shapes_root / "annotations.json")
    assert len(same.records("val")) == 64  # an explicit val split is not cut from train
    with pytest.raises(DatasetError, match="differ"):
        _data(shapes_root, class_names=["a", "b", "c"]).setup("fit")


def test_predict_batches_carry_path_and_sizes(shapes_root, tmp_path):
    Image.fromarray(np.zeros((30, 80, 3), np.uint8)).save(tmp_path / "wide.png")
    Image.fromarray(np.zeros((50, 20), np.uint8), "L").save(tmp_path / "tall_gray.png")
    data = DetectionDataModule(predict_root=tmp_path, class_names=["a", "b"], image_size=64, num_workers=0)
    assert data.num_classes == 2 and data.category_ids == [0, 1]
    data.setup("predict")
    assert [p.name for p in data.predict_files] == ["tall_gray.png", "wide.png"]
    images, metas = next(iter(data.predict_dataloader()))
    assert [m["index"] for m in metas] == [0, 1]
    assert [m["path"] for m in metas] == [str(p) for p in data.predict_files]
    assert [m["orig_size"] for m in metas] == [(50, 20), (30, 80)]
    assert [m["size"] for m in metas] == [(64, 64), (64, 64)]
    assert all(image.shape == (3, 64, 64) for image in images)


def test_worker_processes_and_checkpoint_classes(shapes_root):
    data = _data(shapes_root, num_workers=2, batch_size=8)
    data.setup("fit")
    _assert_contract_batch(next(iter(data.train_dataloader())), 64, 3)
    state = data.state_dict()
    assert state == {"class_names": ["circle", "square", "triangle"], "category_ids": [3, 7, 11]}
    data.load_state_dict(state)
    with pytest.raises(CheckpointMismatchError):
        data.load_state_dict({"class_names": ["cat"]})


def test_a_class_subset_keeps_only_its_boxes_reindexed_with_negatives_optional(shapes_root):
    full = _data(shapes_root, val_fraction=0.0)
    subset = _data(shapes_root, val_fraction=0.0, classes=["triangle", "circle"])
    assert subset.num_classes == 2 and subset.class_names == ["triangle", "circle"]
    assert subset.category_ids == [11, 3]
    old_to_new = {2: 0, 0: 1}
    by_path = {r.path: r for r in full.records("train")}
    kept = subset.records("train")
    assert [r.path for r in kept] == list(by_path)  # negatives kept: every image, same order
    for record in kept:
        before = by_path[record.path]
        mask = np.isin(before.labels, list(old_to_new))
        np.testing.assert_array_equal(record.boxes, before.boxes[mask])
        assert record.labels.tolist() == [old_to_new[int(label)] for label in before.labels[mask]]
    positives = _data(shapes_root, val_fraction=0.0, classes=["square"], keep_negatives=False).records("train")
    expected = [r.path for r in full.records("train") if (r.labels == 1).any()]
    assert [r.path for r in positives] == expected and all((r.labels == 0).all() for r in positives)
    # validation keeps every image even without negatives in training (COCO evaluation of a subset)
    split = _data(shapes_root, classes=["square"], keep_negatives=False)
    assert len(split.records("val")) == len(_data(shapes_root).records("val"))


@pytest.mark.parametrize(("classes", "message"), [(["sqare"], "close: square"), (["circle", "circle"], "distinct")])
def test_an_unknown_or_repeated_subset_class_is_refused_naming_the_classes(shapes_root, classes, message):
    with pytest.raises(DatasetError, match=message):
        _ = _data(shapes_root, classes=classes).num_classes
