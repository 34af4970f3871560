from __future__ import annotations

import csv
import json

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from cvft.callbacks import TrainingReport, output_dir
from cvft.medical import medical_metrics
from cvft.medical.report import CSV_COLUMNS, MedicalReport, collect_probabilities
from cvft.tasks import ImageClassifier

PNGS = ("roc_curves.png", "reliability_diagram.png", "confusion_matrix.png")


def _loader(targets: torch.Tensor, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(len(targets), 3, 32, 32, generator=generator)
    return DataLoader(TensorDataset(images, targets), batch_size=8)


def _fit(tmp_path, model: ImageClassifier, train: DataLoader, val: DataLoader, report: MedicalReport) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        accelerator="cpu",
        default_root_dir=tmp_path,
        logger=CSVLogger(tmp_path, name="run"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[report],
    )
    trainer.fit(model, train, val)
    return trainer


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_binary_report_after_fit_and_test(tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier("test_resnet", pretrained=False, class_names=["normal", "pneumonia"], warmup_epochs=0)
    targets = torch.arange(16) % 2
    val = _loader(targets, 1)
    report = MedicalReport(operating_point="youden", n_bins=5)
    trainer = _fit(tmp_path, model, _loader(targets, 0), val, report)

    folder = output_dir(trainer)
    for name in (*PNGS, "medical_metrics.csv", "medical_metrics.json"):
        assert (folder / name).stat().st_size > 0, name
    rows = _rows(folder / "medical_metrics.csv")
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [(r["split"], r["class"]) for r in rows] == [("val", "pneumonia"), ("val", "macro")]
    probs, labels = collect_probabilities(model, val, multi_label=False)
    expected = medical_metrics(probs, labels, "binary", threshold="youden", class_names=model.class_names, n_bins=5)
    assert float(rows[0]["auroc"]) == pytest.approx(expected["classes"][0]["auroc"], abs=1e-5)
    assert float(rows[0]["threshold"]) == pytest.approx(report.thresholds[0], abs=1e-5)
    assert json.loads((folder / "medical_metrics.json").read_text())["task"] == "binary"

    trainer.test(model, val, verbose=False)
    for name in PNGS:
        assert (folder / f"test_{name}").is_file()
    test_rows = _rows(folder / "test_medical_metrics.csv")
    assert float(test_rows[0]["threshold"]) == pytest.approx(float(rows[0]["threshold"]), abs=1e-5)  # chosen on val
    logged = _rows(folder / "metrics.csv")
    assert any(row.get("medical_val/auroc_macro") for row in logged)
    assert any(row.get("medical_test/balanced_accuracy") for row in logged)


def test_multilabel_report(tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier("test_resnet", pretrained=False, class_names=["a", "b", "c"], multi_label=True)
    targets = torch.stack([torch.arange(16) % 2, (torch.arange(16) // 2) % 2, (torch.arange(16) // 4) % 2], 1)
    trainer = _fit(tmp_path, model, _loader(targets.float(), 0), _loader(targets.float(), 1), MedicalReport())
    folder = output_dir(trainer)
    for name in PNGS:
        assert (folder / name).is_file()
    rows = _rows(folder / "medical_metrics.csv")
    assert [r["class"] for r in rows] == ["a", "b", "c", "macro"]
    assert all(float(r["threshold"]) == 0.5 for r in rows[:3])


def test_disabled_report_writes_nothing(tmp_path):
    model = ImageClassifier("test_resnet", pretrained=False, num_classes=3)
    targets = torch.arange(8) % 3
    trainer = _fit(tmp_path, model, _loader(targets, 0), _loader(targets, 1), MedicalReport(enabled=False))
    assert not (output_dir(trainer) / "medical_metrics.csv").exists()


@pytest.mark.parametrize(
    ("trainer_options", "fresh_passes"),
    [
        ({}, 0),  # the last validation epoch covered every image at the final weights: its probabilities are used
        ({"limit_val_batches": 1}, 1),  # it saw one of two batches
        ({"check_val_every_n_epoch": 2}, 1),  # no validation epoch ran after training (only the sanity check)
    ],
)
def test_report_reuses_the_validation_loop_only_when_it_saw_every_image_at_the_final_weights(
    tmp_path, monkeypatch, trainer_options, fresh_passes
):
    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        return collect_probabilities(*args, **kwargs)

    monkeypatch.setattr("cvft.medical.report.collect_probabilities", counting)
    torch.manual_seed(0)
    model = ImageClassifier("test_resnet", pretrained=False, num_classes=2, warmup_epochs=0)
    targets = torch.arange(16) % 2
    val = _loader(targets, 1)
    report = MedicalReport(operating_point="youden")
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=2, accelerator="cpu", default_root_dir=tmp_path, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[report],
        **trainer_options,
    )  # fmt: skip
    trainer.fit(model, _loader(targets, 0), val)
    assert len(calls) == fresh_passes
    probs, labels = collect_probabilities(model, val, multi_label=False)
    expected = medical_metrics(probs, labels, "binary", threshold="youden", class_names=["0", "1"])
    assert report.results["val"]["auroc_macro"] == pytest.approx(expected["auroc_macro"], abs=1e-6)
    assert report.thresholds[0] == pytest.approx(expected["classes"][0]["threshold"], abs=1e-5)

    calls.clear()
    trainer.test(model, val, verbose=False)
    assert calls == []  # the test loop's own probabilities
    assert report.results["test"]["auroc_macro"] == pytest.approx(expected["auroc_macro"], abs=1e-6)


def test_training_report_leaves_the_confusion_picture_to_the_medical_report(tmp_path, monkeypatch):
    def not_expected(*args, **kwargs):
        raise AssertionError("TrainingReport drew a confusion matrix that MedicalReport redraws")

    monkeypatch.setattr("cvft.callbacks.report.plot_confusion_matrix", not_expected)
    model = ImageClassifier("test_resnet", pretrained=False, num_classes=2, warmup_epochs=0)
    targets = torch.arange(16) % 2
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=2, accelerator="cpu", default_root_dir=tmp_path, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[TrainingReport(), MedicalReport()],
    )  # fmt: skip
    trainer.fit(model, _loader(targets, 0), _loader(targets, 1))
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 0
    assert (tmp_path / "confusion_matrix.csv").is_file()
