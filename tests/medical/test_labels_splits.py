"""Medical label CSV files and patient-level splits: parsing, leak-free splits, refusal of leaking supplied splits."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cvft.data.medical import (
    MedicalImageDataModule,
    MedicalRecord,
    check_no_patient_leak,
    patient_split,
    read_medical_csv,
)
from cvft.errors import DatasetError


def write_csv(folder: Path, rows: list[str], name: str = "labels.csv", header: str = "path,label,patient_id") -> Path:
    for row in rows:
        image = folder / row.split(",")[0]
        if not image.exists():
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    path = folder / name
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_multi_label_rows_metadata_and_none_label(tmp_path):
    csv = write_csv(
        tmp_path,
        ["a.png,Nodule|Effusion,p1,train,63,PA", "b.png,No Finding,p2,val,41,AP", "c.png,Effusion,p2,val,41,AP"],
        header="path,label,patient_id,split,age,view",
    )
    records, names = read_medical_csv(csv, multi_label=True, none_label="No Finding")
    assert names == ["Effusion", "Nodule"]
    assert [r.target for r in records] == [(0, 1), (), (0,)]
    assert [r.patient_id for r in records] == ["p1", "p2", "p2"]
    assert [r.split for r in records] == ["train", "val", "val"]
    assert records[0].metadata == {"age": "63", "view": "PA"}
    assert records[0].path == tmp_path / "a.png"
    with_none, names_with_none = read_medical_csv(csv, multi_label=True)  # without none_label it is a class
    assert names_with_none == ["Effusion", "No Finding", "Nodule"] and with_none[1].target == (1,)


def test_label_errors_name_the_row(tmp_path):
    csv = write_csv(tmp_path, ["a.png,Nodule,p1", "b.png,,p2"])
    with pytest.raises(DatasetError, match=r"line 3 \(b.png\).*none_label"):
        read_medical_csv(csv, multi_label=True)
    records, _ = read_medical_csv(csv, multi_label=True, none_label="No Finding")
    assert records[1].target == ()
    val = write_csv(tmp_path, ["c.png,Pneumothorax,p3"], name="val.csv")
    with pytest.raises(DatasetError, match=r"val.csv line 2 \(c.png\).*\['Pneumothorax'\].*training classes"):
        read_medical_csv(val, class_names=["Effusion", "Nodule"])
    both = write_csv(tmp_path, ["d.png,No Finding|Nodule,p4"], name="both.csv")
    with pytest.raises(DatasetError, match="combines the no-finding label"):
        read_medical_csv(both, multi_label=True, none_label="No Finding")
    with pytest.raises(ValueError, match="needs multi_label=True"):
        read_medical_csv(csv, none_label="No Finding")


def test_missing_files_are_listed_with_their_lines(tmp_path):
    csv = write_csv(tmp_path, ["a.png,0,p1"])
    csv.write_text("path,label,patient_id\na.png,0,p1\nlost/x.dcm,1,p2\nlost/y.dcm,1,p3\n")
    with pytest.raises(DatasetError, match=r"(?s)2 image\(s\).*line 3: .*lost/x.dcm.*line 4: .*lost/y.dcm.*root="):
        read_medical_csv(csv)


def test_bad_split_cell_and_missing_columns(tmp_path):
    csv = write_csv(tmp_path, ["a.png,0,p1,holdout"], header="path,label,patient_id,split")
    with pytest.raises(DatasetError, match="split 'holdout'.*train, val, test"):
        read_medical_csv(csv)
    csv.write_text("file,label\na.png,0\n")
    with pytest.raises(DatasetError, match="'path'.*path_column="):
        read_medical_csv(csv)
    records, _ = read_medical_csv(csv, path_column="file")
    assert records[0].patient_id is None and records[0].split is None


def synthetic_records(rng: random.Random, multi_label: bool) -> list[MedicalRecord]:
    records = []
    for p in range(rng.randint(20, 60)):
        label = rng.choices(range(3), weights=(6, 3, 1))[0]
        for i in range(rng.randint(1, 4)):
            target = tuple(sorted({label, rng.randrange(3)})) if multi_label else label
            records.append(MedicalRecord(Path(f"p{p}/{i}.dcm"), target, f"p{p}"))
    rng.shuffle(records)
    return records


@pytest.mark.parametrize("multi_label", [False, True])
def test_patient_split_never_shares_a_patient(multi_label):
    rng = random.Random(0)
    for seed in range(40):
        records = synthetic_records(rng, multi_label)
        splits = patient_split(records, val_fraction=0.2, test_fraction=0.2, seed=seed)
        check_no_patient_leak(splits)
        patients = [{r.patient_id for r in part} for part in splits.values()]
        assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
        assert sorted(map(str, (r.path for part in splits.values() for r in part))) == sorted(
            str(r.path) for r in records
        )
        n = len({r.patient_id for r in records})
        assert abs(len(patients[1]) - 0.2 * n) <= 3 and abs(len(patients[2]) - 0.2 * n) <= 3
        again = patient_split(records, val_fraction=0.2, test_fraction=0.2, seed=seed)
        assert again == splits


def test_patient_split_is_reproducible_and_order_independent():
    records = synthetic_records(random.Random(1), multi_label=False)
    first = patient_split(records, 0.25, 0.0, seed=7)
    shuffled = patient_split(sorted(records, key=lambda r: str(r.path)), 0.25, 0.0, seed=7)
    assert {r.patient_id for r in first["val"]} == {r.patient_id for r in shuffled["val"]}
    other = patient_split(records, 0.25, 0.0, seed=8)
    assert {r.patient_id for r in first["val"]} != {r.patient_id for r in other["val"]}


def test_leak_check_names_patient_and_files():
    splits = {
        "train": [MedicalRecord(Path("p7/a.dcm"), 0, "p7"), MedicalRecord(Path("p1/a.dcm"), 0, "p1")],
        "val": [MedicalRecord(Path("p7/b.dcm"), 0, "p7")],
    }
    expected = r"(?s)1 patient.*'p7': train \(1: p7/a.dcm\); val \(1: p7/b.dcm\).*one split"
    with pytest.raises(DatasetError, match=expected):
        check_no_patient_leak(splits, source="labels.csv")


def test_datamodule_refuses_leaking_split_column_and_val_csv(tmp_path):
    csv = write_csv(
        tmp_path, ["a.png,0,p1,train", "b.png,1,p2,train", "c.png,1,p2,val"], header="path,label,patient_id,split"
    )
    with pytest.raises(DatasetError, match="patient 'p2'"):
        _ = MedicalImageDataModule(csv=str(csv), num_workers=0).class_names
    train = write_csv(tmp_path, ["a.png,0,p1", "b.png,1,p2", "d.png,0,p3"], name="train.csv")
    val = write_csv(tmp_path, ["c.png,1,p2"], name="val.csv")
    with pytest.raises(DatasetError, match="(?s)patient 'p2'.*c.png"):
        _ = MedicalImageDataModule(csv=str(train), val_csv=str(val), num_workers=0).class_names
    train = write_csv(tmp_path, [f"t{i}.png,{i % 2},p{i}" for i in range(6)], name="train6.csv")
    ok = write_csv(tmp_path, ["e.png,1,p9"], name="val_ok.csv")
    data = MedicalImageDataModule(csv=str(train), val_csv=str(ok), test_fraction=0.34, num_workers=0)
    assert [len(data.records(s)) for s in ("train", "val", "test")] == [4, 1, 2]  # test: one patient per class
