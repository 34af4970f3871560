"""``preference_pairs`` of the labelled DataModules: CSV and generated pairs for the training split, checked input."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cvft.data import ImageFolderDataModule
from cvft.data.preference import PreferencePairDataset
from cvft.errors import DatasetError

CLASSES = {"cat": 3, "dog": 3, "owl": 3}


def _data(root: Path, preference_pairs, **options) -> ImageFolderDataModule:
    defaults = {"image_size": 16, "batch_size": 2, "num_workers": 0, "augment": "none", "val_fraction": 0.34}
    return ImageFolderDataModule(root, preference_pairs=preference_pairs, **{**defaults, **options})


def test_csv_pairs_with_class_names_give_the_right_rows(make_class_folders, save_image, tmp_path):
    root = make_class_folders(CLASSES)
    save_image(tmp_path / "pairs" / "extra.png", value=7)  # relative to the CSV's folder
    csv = tmp_path / "pairs" / "pairs.csv"
    rows = ["path,preferred,rejected,weight", "extra.png,owl,cat,2.5", "dog/000.png,dog,2", "extra.png,0,owl"]
    csv.write_text("\n".join(rows))  # dog/000.png is relative to root
    data = _data(root, str(csv))
    data.setup("fit")
    train = data.datasets["train"]
    assert isinstance(train, PreferencePairDataset)
    targets = [train[i][1].tolist() for i in range(len(train))]
    assert targets == [[2.0, 0.0, 2.5], [1.0, 2.0, 1.0], [0.0, 2.0, 1.0]]
    # the same file twice is one image, read with the training pipeline (16 px)
    assert len(train.images) == 2 and torch.equal(train[0][0], train[2][0])
    assert train[0][0].shape == (3, 16, 16)
    # validation stays labelled; the option is recorded with the data's hyperparameters
    val_images, val_target = data.datasets["val"][0]
    assert val_target.dtype == torch.int64 and val_target.ndim == 0
    assert data.hparams["preference_pairs"] == str(csv)


def test_generated_pairs_index_the_labelled_training_split(make_class_folders):
    root = make_class_folders(CLASSES)
    data = _data(root, {"from": "labels", "seed": 3})
    data.setup("fit")
    train, samples = data.datasets["train"], data.samples("train")
    labelled = data._build_dataset("train")
    assert len(train) == len(samples)
    for index in range(len(train)):
        image, (preferred, rejected, weight) = train[index]
        assert preferred == samples[index].target and rejected != preferred and weight == 1.0
        assert torch.equal(image, labelled[index][0])
    assert data.hparams["preference_pairs"] == {"from": "labels", "seed": 3}


def test_cost_matrix_pairs_prefer_the_cheapest_decision(make_class_folders):
    root = make_class_folders(CLASSES)
    costs = [[0, 1, 4], [2, 0, 2], [9, 9, 0]]
    data = _data(root, {"from": "cost_matrix", "cost_matrix": costs})
    data.setup("fit")
    train, samples = data.datasets["train"], data.samples("train")
    for index in range(len(train)):
        preferred, rejected, weight = train[index][1].tolist()
        truth = samples[index].target
        assert preferred == truth and weight == costs[truth][int(rejected)] - costs[truth][truth]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"from": "votes"}, "unknown generator"),
        ({"from": "labels", "csv": "pairs.csv"}, "CSV path goes alone"),
        ({"from": "labels", "cost_matrix": [[0, 1], [1, 0]]}, "goes with from: cost_matrix"),
        ({"from": "cost_matrix"}, "square C x C"),
        ({"from": "cost_matrix", "cost_matrix": [[0, 1, 2], [1, 0]]}, "square C x C"),
        ({"from": "labels", "seed": "one"}, "seed must be an integer"),
        (3, "CSV path"),
    ],
)
def test_bad_specs_are_refused_at_construction(make_class_folders, tmp_path, spec, expected):
    root = make_class_folders(CLASSES)
    with pytest.raises(DatasetError, match=expected):
        _data(root, str(tmp_path / spec) if isinstance(spec, str) else spec)


def test_bad_csv_rows_are_refused_at_setup(make_class_folders, tmp_path):
    root = make_class_folders(CLASSES)
    cases = {
        "cat/000.png,cat,horse": "'horse' is neither a class name nor an index; known classes: cat, dog, owl",
        "cat/000.png,cat,7": "class index 7 is out of range of 3 classes",
        "cat/000.png,cat,cat": "the same",
        "nowhere.png,cat,dog": "1 image(s) not found",
    }
    with pytest.raises(DatasetError, match="missing.csv does not exist"):
        _data(root, str(tmp_path / "missing.csv")).setup("fit")
    _data(root, str(tmp_path / "missing.csv")).setup("test")  # testing does not need the training pairs
    for row, expected in cases.items():
        csv = tmp_path / "pairs.csv"
        csv.write_text(row)
        with pytest.raises(DatasetError, match=re.escape(expected)):
            _data(root, str(csv)).setup("fit")
    with pytest.raises(DatasetError, match="square|4 x 4 but the data has 3 classes"):
        _data(root, {"from": "cost_matrix", "cost_matrix": [[0] * 4] * 4}).setup("fit")


def test_multi_label_csv_pairs_are_label_sets(save_image, tmp_path):
    label_sets = ["cat", "cat|dog", "dog", "owl", "cat|owl", "dog|owl"]
    for i in range(len(label_sets)):
        save_image(tmp_path / f"{i}.png", value=i)
    rows = [f"{i}.png,{labels}" for i, labels in enumerate(label_sets)]
    (tmp_path / "labels.csv").write_text("\n".join(["path,label", *rows]))
    (tmp_path / "pairs.csv").write_text("0.png,cat;dog,owl,2\n1.png,,cat\n")
    data = ImageFolderDataModule(
        csv=str(tmp_path / "labels.csv"), multi_label=True, preference_pairs=str(tmp_path / "pairs.csv"),
        image_size=16, batch_size=2, num_workers=0, augment="none", val_fraction=0.0,
    )  # fmt: skip
    data.setup("fit")
    assert data.class_names == ["cat", "dog", "owl"]
    rows = [data.datasets["train"][i][1].tolist() for i in range(2)]
    assert rows == [[1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 2.0], [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]]
    with pytest.raises(DatasetError, match="single-label data"):
        ImageFolderDataModule(
            csv=str(tmp_path / "labels.csv"), multi_label=True, preference_pairs={"from": "cost_matrix"}
        )


def test_the_data_and_the_strategies_must_agree_on_pairs(make_class_folders):
    root = make_class_folders(CLASSES)

    class Stack:
        def __init__(self, *pair_targets: bool) -> None:
            self.strategies = [
                type("S", (), {"name": f"s{i}", "pair_targets": p})() for i, p in enumerate(pair_targets)
            ]

    with pytest.raises(DatasetError, match="no strategy trains on pairs.*--data.preference_pairs out"):
        _data(root, {"from": "labels"})._check_pair_objective(Stack(False))
    with pytest.raises(DatasetError, match="s1 trains on preference pairs.*Set --data.preference_pairs"):
        _data(root, None)._check_pair_objective(Stack(False, True))
    _data(root, {"from": "labels"})._check_pair_objective(Stack(False, True))


def test_medical_data_reads_pair_csvs_of_medical_images_and_generates_pairs(tmp_path):
    pytest.importorskip("pydicom")
    from cvft.data import MedicalImageDataModule

    rng = np.random.default_rng(0)
    rows = ["path,label,patient_id"]
    for i in range(6):
        cv2.imwrite(str(tmp_path / f"{i}.png"), rng.integers(0, 4096, (20, 18), dtype=np.uint16))  # 16-bit
        rows.append(f"{i}.png,{'abnormal' if i % 2 else 'normal'},p{i}")
    (tmp_path / "labels.csv").write_text("\n".join(rows))
    (tmp_path / "pairs.csv").write_text("0.png,abnormal,normal,3\n5.png,1,0\n")
    common = {"csv": str(tmp_path / "labels.csv"), "image_size": 16, "num_workers": 0, "val_fraction": 0.34}
    data = MedicalImageDataModule(preference_pairs=str(tmp_path / "pairs.csv"), **common)
    data.setup("fit")
    train = data.datasets["train"]
    assert [train[i][1].tolist() for i in range(2)] == [[0.0, 1.0, 3.0], [1.0, 0.0, 1.0]]
    assert train[0][0].shape == (3, 16, 16)  # read by the medical reader, with the training pipeline
    generated = MedicalImageDataModule(preference_pairs={"from": "labels"}, **common)
    generated.setup("fit")
    records = generated.records("train")
    assert [generated.datasets["train"][i][1][0].item() for i in range(len(records))] == [
        float(r.target) for r in records
    ]
