"""MedicalImageDataModule end to end: DICOM + 16-bit PNG CSVs, MedMNIST arrays, sampling, augmentation, in_chans=1."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from quiet_trainer import make_trainer
from safetensors.torch import save_file

from cvft.backbones import create_backbone
from cvft.data import MedicalImageDataModule
from cvft.data.medical import MedicalArrayDataset, build_medical_transforms
from cvft.data.split_module import FILE_WORKERS
from cvft.tasks import ImageClassifier

pydicom = pytest.importorskip("pydicom")
CT_SMALL = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
MEDMNIST = Path(__file__).resolve().parents[3] / "shared" / "assets" / "medmnist_28"


def write_labelled(tmp_path: Path, rows: list[tuple[str, str, str]], header: str = "path,label,patient_id") -> Path:
    """rows: (file name, label, patient); .dcm files are copies of CT_small, .png files random 16-bit images."""
    rng = np.random.default_rng(0)
    for name, _, _ in rows:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".dcm"):
            shutil.copy(CT_SMALL, path)
        elif not path.exists():
            cv2.imwrite(str(path), rng.integers(0, 4096, (40, 36), dtype=np.uint16))
    csv = tmp_path / "labels.csv"
    csv.write_text("\n".join([header, *(",".join(row) for row in rows)]) + "\n")
    return csv


def labels_only(tmp_path: Path, labels: list[str]) -> Path:
    return write_labelled(tmp_path, [(f"{i}.png", label, f"p{i}") for i, label in enumerate(labels)])


def test_trains_image_classifier_on_dicom_and_16bit_png(tmp_path):
    rows = []
    for p in range(8):
        label = "abnormal" if p % 2 else "normal"
        rows += [(f"p{p}/ct.dcm", label, f"p{p}"), (f"p{p}/xray.png", label, f"p{p}")]
    data = MedicalImageDataModule(
        csv=str(write_labelled(tmp_path, rows)),
        backbone="test_resnet",
        image_size=32,
        batch_size=4,
        num_workers=0,
        val_fraction=0.25,
        sampler="weighted",
    )
    assert data.num_classes == 2 and data.mean == (0.5, 0.5, 0.5)
    assert [len(data.records(s)) for s in ("train", "val")] == [12, 4]
    val_patients = {r.patient_id for r in data.records("val")}
    assert not val_patients & {r.patient_id for r in data.records("train")}
    images, targets = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and targets.dtype == torch.int64
    assert torch.equal(images[:, 0], images[:, 1])  # grayscale repeated into the RGB channels
    model = ImageClassifier("test_resnet", pretrained=False, num_classes=data.num_classes, warmup_epochs=0)
    trainer = make_trainer(
        1, limit_train_batches=2, limit_val_batches=1, default_root_dir=tmp_path, num_sanity_val_steps=2
    )  # with Lightning's sanity check: validation runs once before training
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["val/loss"])


def test_weighted_sampler_balances_classes_and_is_seeded(tmp_path):
    labels = ["common"] * 48 + ["mid"] * 12 + ["rare"] * 4
    csv = str(labels_only(tmp_path, labels))
    data = MedicalImageDataModule(csv=csv, val_fraction=0.0, sampler="weighted", seed=3, num_workers=0)
    assert data.class_counts == [48, 12, 4]
    names = data.class_names
    sampler = data.weighted_sampler()
    draws = [names[data.records("train")[i].target] for _ in range(30) for i in sampler]  # 30 epochs
    counts = Counter(draws)
    expected = len(draws) / 3
    chi_square = sum((counts[name] - expected) ** 2 / expected for name in names)
    assert chi_square < 13.8, counts  # 2 degrees of freedom, p = 0.001
    same = MedicalImageDataModule(csv=csv, val_fraction=0.0, sampler="weighted", seed=3, num_workers=0)
    other = MedicalImageDataModule(csv=csv, val_fraction=0.0, sampler="weighted", seed=4, num_workers=0)
    assert list(data.weighted_sampler()) == list(same.weighted_sampler()) != list(other.weighted_sampler())


def test_multi_label_pos_weight_and_rarest_label_sampling(tmp_path):
    labels = ["A"] * 6 + ["A|B"] * 3 + ["B"] * 1 + ["A|C"] * 2 + ["No Finding"] * 4
    csv = str(labels_only(tmp_path, labels))
    data = MedicalImageDataModule(
        csv=csv, multi_label=True, none_label="No Finding", val_fraction=0.0, sampler="weighted", num_workers=0
    )
    assert data.class_names == ["A", "B", "C"] and data.class_counts == [11, 4, 2]
    assert data.pos_weight == pytest.approx([(16 - 11) / 11, (16 - 4) / 4, (16 - 2) / 2])
    weights = data.weighted_sampler().weights.tolist()
    # groups by rarest positive label: C {A|C} 2 images, B {A|B, B} 4, A {A} 6, no finding 4
    assert weights[:6] == [1 / 6] * 6 and weights[6:10] == [1 / 4] * 4 and weights[10:12] == [1 / 2] * 2
    assert weights[12:] == [1 / 4] * 4
    _, targets = data.train_dataloader().dataset[12]
    assert targets.tolist() == [0.0, 0.0, 0.0]


def asymmetric_npz(path: Path, count: int = 8) -> Path:
    image = np.zeros((28, 28), np.uint8)
    image[:, :10] = 255  # bright left side, like a marker on the patient's right
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = np.repeat(image[None], count, axis=0)
        arrays[f"{split}_labels"] = (np.arange(count) % 2)[:, None]
    np.savez(path, **arrays)
    return path


def test_automatic_workers_load_arrays_in_process_and_files_in_workers(tmp_path):
    npz = asymmetric_npz(tmp_path / "tiny.npz")
    arrays = MedicalImageDataModule(medmnist=str(npz), image_size=28, channels=1, batch_size=4)
    assert arrays.num_workers is None
    assert arrays.train_dataloader().num_workers == 0 and arrays.val_dataloader().num_workers == 0
    assert MedicalImageDataModule(medmnist=str(npz), num_workers=1).train_dataloader().num_workers == 1
    for i in range(4):
        Image.new("L", (8, 8), 40 * i).save(tmp_path / f"{i}.png")
    (tmp_path / "labels.csv").write_text("path,label\n" + "".join(f"{i}.png,{'ab'[i % 2]}\n" for i in range(4)))
    files = MedicalImageDataModule(csv=str(tmp_path / "labels.csv"), image_size=8, val_fraction=0.0, batch_size=2)
    files.setup("fit")
    assert files.workers_for(files.datasets["train"]) == FILE_WORKERS


@pytest.mark.parametrize("augment", ["medical", "medical_flip"])
def test_medical_preset_never_flips(tmp_path, augment):
    npz = asymmetric_npz(tmp_path / "tiny.npz")
    data = MedicalImageDataModule(
        medmnist=str(npz), image_size=28, augment=augment, channels=1, mean=(0.0,), std=(1.0,), num_workers=0
    )
    assert [len(data.records(s)) for s in ("train", "val", "test")] == [8, 8, 8]
    data.setup("fit")
    dataset = data.datasets["train"]
    flipped = 0
    for i in range(150):
        image, _ = dataset[i % len(dataset)]
        assert image.shape == (1, 28, 28)
        flipped += int(image[0, :, :14].mean() < image[0, :, 14:].mean())
    if augment == "medical":
        assert flipped == 0
    else:
        assert 40 < flipped < 110


def test_grayscale_model_from_local_weights_file_sums_rgb_filters(tmp_path):
    rgb = create_backbone("test_resnet", num_classes=2)
    path = tmp_path / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, str(path))
    gray = create_backbone("test_resnet", weights=str(path), num_classes=2, in_chans=1)
    expected = rgb.state_dict()["conv1.0.weight"].sum(dim=1, keepdim=True)
    assert gray.state_dict()["conv1.0.weight"].shape[1] == 1
    assert torch.allclose(gray.state_dict()["conv1.0.weight"], expected)
    # end to end: 1-channel batches from the data module into an in_chans=1 classifier with those weights
    images = np.random.default_rng(0).integers(0, 255, (4, 28, 28), dtype=np.uint8)
    dataset = MedicalArrayDataset(images, [0, 1, 0, 1], build_medical_transforms(32, (0.5,), (0.5,), False), 1)
    batch = torch.stack([dataset[i][0] for i in range(4)])
    model = ImageClassifier("test_resnet", pretrained=False, weights=str(path), num_classes=2, in_chans=1).eval()
    rgb.eval()
    with torch.no_grad():  # a gray image as 1 channel with summed filters == the same image repeated into RGB
        assert torch.allclose(model(batch), rgb(batch.repeat(1, 3, 1, 1)), atol=1e-5)


@pytest.mark.assets
@pytest.mark.skipif(not (MEDMNIST / "pneumoniamnist.npz").is_file(), reason=f"needs {MEDMNIST} (not shipped)")
def test_pneumoniamnist_official_split_sizes():
    data = MedicalImageDataModule(
        medmnist="pneumoniamnist", medmnist_root=str(MEDMNIST), image_size=28, batch_size=16, num_workers=0
    )
    assert [len(data.records(s)) for s in ("train", "val", "test")] == [4708, 524, 624]
    assert data.num_classes == 2 and sum(data.class_counts) == 4708
    images, targets = next(iter(data.val_dataloader()))
    assert images.shape == (16, 3, 28, 28) and set(targets.tolist()) <= {0, 1}


def test_predict_reads_only_medical_images_from_a_folder(tmp_path):
    csv = labels_only(tmp_path / "train", ["a", "b", "a", "b"])
    folder = tmp_path / "to_predict"
    (folder / "study").mkdir(parents=True)
    shutil.copy(CT_SMALL, folder / "study" / "slice")  # a DICOM without suffix: found by its preamble
    cv2.imwrite(str(folder / "xray.png"), np.full((40, 36), 30000, dtype=np.uint16))
    (folder / "notes.txt").write_text("not an image")
    (folder / "labels.csv").write_text("path,label\n")
    data = MedicalImageDataModule(
        csv=str(csv), predict_root=str(folder), backbone="test_resnet", image_size=32, batch_size=4, num_workers=0
    )
    assert data.predict_files == [folder / "study" / "slice", folder / "xray.png"]
    images, index = next(iter(data.predict_dataloader()))
    assert images.shape == (2, 3, 32, 32) and index.tolist() == [0, 1]


class CountingTransform:
    """A deterministic transform that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, image: np.ndarray) -> dict[str, torch.Tensor]:
        self.calls += 1
        return {"image": torch.from_numpy(image).permute(2, 0, 1) * 2.0}


def test_deterministic_transform_runs_once_per_array_image():
    images = np.random.default_rng(0).integers(0, 255, (4, 6, 6), dtype=np.uint8)
    transform = CountingTransform()
    cached = MedicalArrayDataset(images, [0, 1, 0, 1], transform, 1, deterministic_transform=True, return_index=True)
    plain = MedicalArrayDataset(images, [0, 1, 0, 1], CountingTransform(), 1, return_index=True)
    for _ in range(3):
        for i in range(4):
            for got, want in zip(cached[i], plain[i], strict=True):
                assert torch.equal(got, want)
    assert transform.calls == 4 and plain.transform.calls == 12
    cached[-1][0].zero_()  # items are copies: changing one leaves the cache intact
    assert torch.equal(cached[3][0], plain[3][0]) and transform.calls == 4


def test_random_or_oversized_transforms_are_never_kept(monkeypatch):
    import cvft.data.medical.dataset as dataset_module

    images = np.zeros((4, 6, 6), np.uint8)
    random_views = MedicalArrayDataset(images, [0, 1, 0, 1], CountingTransform(), 1)
    two_views = MedicalArrayDataset(
        images, [0, 1, 0, 1], CountingTransform(), 1, num_views=2, deterministic_transform=True
    )
    monkeypatch.setattr(dataset_module, "TRANSFORMED_CACHE_BYTES", 4 * 36 * 4 - 1)  # one byte short of the split
    too_big = MedicalArrayDataset(images, [0, 1, 0, 1], CountingTransform(), 1, deterministic_transform=True)
    for dataset in (random_views, two_views, too_big):
        dataset[0], dataset[0]
    assert [d.transform.calls for d in (random_views, two_views, too_big)] == [2, 4, 2]


@pytest.mark.parametrize(("augment", "train_kept"), [("none", True), ("medical", False)])
def test_datamodule_keeps_transformed_images_of_deterministic_splits(tmp_path, augment, train_kept):
    data = MedicalImageDataModule(medmnist=str(asymmetric_npz(tmp_path / "tiny.npz")), image_size=28, augment=augment)
    data.setup("fit")
    assert data.datasets["train"].deterministic_transform is train_kept
    assert data.datasets["val"].deterministic_transform is True
