"""`cvft compare` on the medical and detection tasks: real fits (tiny models), each in its own process."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from cvft.cli import main
from cvft.data.detection.shapes import write_shapes_detection

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "compare.csv").open() as handle:
        return list(csv.DictReader(handle))


def _compare(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["compare", *args])
    out = capsys.readouterr()
    assert exit_.value.code == 0, out
    return out.out


@pytest.mark.slow
def test_medical_comparison_reports_auroc_and_the_operating_point(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in (("train", 24), ("val", 12), ("test", 12)):
        labels = np.arange(count) % 2
        images = rng.integers(0, 80, (count, 28, 28), dtype=np.uint8)
        images[labels == 1, 8:20, 8:20] = 230  # a bright lesion marks the positive class
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    np.savez(tmp_path / "tiny.npz", **arrays)
    (tmp_path / "base.yaml").write_text(
        "task: medical\ntrainer:\n  max_epochs: 1\n  accelerator: cpu\n  default_root_dir: out\n"
        "  enable_progress_bar: false\n  enable_model_summary: false\n  log_every_n_steps: 1\n"
        "model:\n  backbone: test_resnet\n  pretrained: false\n  warmup_epochs: 0\n"
        "data:\n  medmnist: tiny.npz\n  image_size: 32\n  batch_size: 8\n  augment: none\n"
        "medical_report:\n  operating_point: youden\n"
    )
    out = _compare(["--config", "base.yaml", "--strategies", "linear_probe,full", "--seeds", "0"], capsys)
    assert "task medical" in out
    folder = tmp_path / "out" / "compare" / "version_0"
    rows = _rows(folder)
    assert [row["strategy"] for row in rows] == ["linear_probe", "full"]
    for row in rows:
        assert row["runs_ok"] == "1"
        for metric in ("test/auroc", "test/sensitivity", "test/specificity", "test/acc"):
            assert 0.0 <= float(row[f"{metric}_mean"]) <= 1.0, metric
    assert [c for c in rows[0] if c.endswith("_mean")][0] == "test/auroc_mean"  # the medical headline first
    assert (folder / "compare.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_detection_comparison_reports_map(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    shapes = write_shapes_detection(tmp_path / "shapes", num_images=16, image_size=64, seed=3)
    (tmp_path / "base.yaml").write_text(
        "trainer:\n  max_epochs: 1\n  limit_train_batches: 2\n  num_sanity_val_steps: 0\n  accelerator: cpu\n"
        "  default_root_dir: out\n  enable_progress_bar: false\n  enable_model_summary: false\n"
        "model:\n  backbone: test_resnet\n  weights: null\n  fpn_channels: 32\n"
        f"data:\n  coco_json: {shapes / 'annotations.json'}\n  image_size: 64\n  batch_size: 4\n  num_workers: 0\n"
    )
    recipe = str(CONFIGS / "detection" / "fcos_shapes.yaml")
    out = _compare(["--config", recipe, "--config", "base.yaml", "--strategies", "full", "--seeds", "0"], capsys)
    assert "task detection" in out
    folder = tmp_path / "out" / "compare" / "version_0"
    (row,) = _rows(folder)
    assert row["strategy"] == "full" and row["runs_ok"] == "1"
    split = "test" if "test/map_mean" in row else "val"
    assert 0.0 <= float(row[f"{split}/map_mean"]) <= 1.0 and 0.0 <= float(row[f"{split}/map_50_mean"]) <= 1.0
    assert float(row["trainable_share"]) == pytest.approx(1.0, abs=0.01)
