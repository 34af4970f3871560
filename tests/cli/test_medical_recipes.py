"""``task: medical`` recipes run through MedicalCLI (MedicalImageDataModule + the medical report)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cli_kit import tiny_medmnist

from cvft.cli import find_task, main

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "medical"


def test_medical_recipes_name_their_task():
    recipes = sorted(CONFIGS.glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        assert find_task(["fit", "--config", str(recipe)]) == "medical"


@pytest.mark.slow
def test_pneumoniamnist_recipe_fits_and_writes_the_medical_report(tmp_path):
    npz = tiny_medmnist(tmp_path / "tiny.npz", (24, 12, 12))
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "pneumoniamnist_lite0_lora.yaml"),
            "--data.medmnist",
            str(npz),
            "--data.image_size",
            "32",
            "--data.batch_size",
            "8",
            "--data.num_workers",
            "0",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "2",
            "--trainer.default_root_dir",
            str(tmp_path / "runs"),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    run = next((tmp_path / "runs" / "cvft").glob("version_*"))
    for name in ("roc_curves.png", "reliability_diagram.png", "medical_metrics.csv", "adapter.safetensors"):
        assert (run / name).is_file(), name
    assert "task: medical" in (run / "config.yaml").read_text()


def test_dicom_csv_recipe_parses_with_a_patient_csv(tmp_path, capsys):
    pydicom = pytest.importorskip("pydicom")
    source = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    rows = ["path,label,patient_id"]
    for i in range(8):
        shutil.copy(source, tmp_path / f"ct{i}.dcm")
        rows.append(f"ct{i}.dcm,{'nodule' if i % 2 else 'normal'},p{i // 2}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "ct_dicom_csv.yaml"), "--data.csv", str(tmp_path / "labels.csv"),
              "--print_config"])  # fmt: skip
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "window: lung" in printed and "task: medical" in printed and "enabled: true" in printed
