"""``cvft`` picks the detection CLI from ``task:``; a detection recipe fits and predicts end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

import cvft.cli
import cvft.cli.classification
import cvft.cli.detection
from cvft.cli import find_task, main
from cvft.data.detection import write_shapes_detection
from cvft.errors import CvftError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPE = CONFIGS / "detection" / "fcos_shapes.yaml"


def _config(tmp_path: Path, name: str, content: dict) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(content))
    return str(path)


def test_find_task_reads_the_flag_then_the_config_files(tmp_path):
    detection = _config(tmp_path, "det.yaml", {"task": "detection", "model": {"head": "fcos"}})
    nested = _config(tmp_path, "nested.yaml", {"fit": {"task": "detection"}})
    plain = _config(tmp_path, "plain.yaml", {"model": {"backbone": "test_resnet"}})
    assert find_task(["fit", "--data.root", "x"]) == "classification"
    assert find_task(["fit", "--config", str(CONFIGS / "efficientnet_lite0_digits.yaml")]) == "classification"
    assert find_task(["fit", "--config", detection]) == "detection"
    assert find_task(["fit", f"--config={nested}"]) == "detection"
    assert find_task(["fit", "-c", detection, "--config", plain]) == "detection"  # a later file without task: keeps it
    assert find_task(["fit", "--task", "classification", "--config", detection]) == "classification"
    assert find_task(["predict", "--task=detection"]) == "detection"
    assert all(find_task(["fit", "--config", str(p)]) == "detection" for p in (CONFIGS / "detection").glob("*.yaml"))


def test_classification_config_runs_the_classification_cli(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        cvft.cli.classification, "CvftCLI", lambda *args, **kwargs: calls.append(("classification", args, kwargs))
    )
    monkeypatch.setattr(cvft.cli.detection, "run_detection_cli", lambda args: calls.append(("detection", args)))
    main(["fit", "--config", str(CONFIGS / "efficientnet_lite0_digits.yaml")])
    assert calls[0][0] == "classification" and calls[0][1][0].__name__ == "ImageClassifier"
    main(["fit", "--config", str(RECIPE)])
    assert calls[1] == ("detection", ["fit", "--config", str(RECIPE)])


def test_classification_cli_accepts_its_task(tmp_path, monkeypatch):
    from cvft.cli import CvftCLI
    from cvft.data import ImageFolderDataModule
    from cvft.tasks import ImageClassifier

    for kind in ("a", "b"):
        (tmp_path / "images" / kind).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (40 * i, 90, 0)).save(tmp_path / "images" / kind / f"{i}.png")
    args = [
        "--task=classification",
        "--model.backbone=test_resnet",
        "--model.pretrained=false",
        f"--data.root={tmp_path / 'images'}",
        "--data.num_workers=0",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli = CvftCLI(ImageClassifier, ImageFolderDataModule, run=False, args=args)
    assert cli.config.task == "classification"


def test_unknown_task_says_which_file_and_the_choices(tmp_path, capsys):
    path = _config(tmp_path, "seg.yaml", {"task": "segmentation", "model": {}})
    with pytest.raises(CvftError, match="segmentation"):
        find_task(["fit", "--config", path])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", path])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "'segmentation'" in message and "seg.yaml" in message and "classification, detection" in message


@pytest.mark.slow
def test_fit_then_predict_a_detection_recipe_end_to_end(shapes_root, tmp_path, capsys):
    runs = tmp_path / "runs"
    main(
        [
            "fit",
            f"--config={RECIPE}",
            "--model.backbone=test_resnet",
            "--model.weights=null",
            "--model.fpn_channels=32",
            f"--data.coco_json={shapes_root / 'annotations.json'}",
            "--data.image_size=64",
            "--data.batch_size=4",
            "--data.num_workers=0",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={runs}",
        ]
    )
    fit_out = capsys.readouterr().out
    assert "trainable parameters" in fit_out and "3 classes" in fit_out
    assert "Final validation" in fit_out and "Best val/map" in fit_out
    run = runs / "detection" / "version_0"
    for name in ("metrics.csv", "learning_curves.png", "config.yaml"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert list(run.glob("events.out.tfevents.*")), "TensorBoard events missing"
    with open(run / "metrics.csv") as handle:
        columns = set(next(csv.reader(handle)))
    assert {"val/map", "val/map_50", "val/ap/circle"} <= columns
    assert yaml.safe_load((run / "config.yaml").read_text())["task"] == "detection"

    # predict on bigger images than the network input: boxes must come back in original pixels
    pictures = write_shapes_detection(tmp_path / "big", num_images=3, image_size=160, seed=5) / "images"
    output = tmp_path / "out" / "predictions.json"
    main(
        [
            "predict",
            f"--config={run / 'config.yaml'}",
            f"--ckpt_path={run / 'checkpoints' / 'best.ckpt'}",
            f"--data.predict_root={pictures}",
            f"--predictions.output={output}",
            "--predictions.score_threshold=0",
            "--predictions.draw=true",
            f"--trainer.default_root_dir={tmp_path / 'predict_runs'}",
        ]
    )
    assert f"Predictions: {output}" in capsys.readouterr().out
    entries = json.loads(output.read_text())
    assert [Path(e["file"]).name for e in entries] == ["00000.png", "00001.png", "00002.png"]
    assert [(e["width"], e["height"]) for e in entries] == [(160, 160), (160, 120), (160, 160)]
    boxes = [(d["box"], e) for e in entries for d in e["detections"]]
    assert boxes, "a detector at score threshold 0 returns boxes"
    assert all(0 <= x1 <= x2 <= e["width"] and 0 <= y1 <= y2 <= e["height"] for (x1, y1, x2, y2), e in boxes)
    assert max(box[2] for box, _ in boxes) > 64, "boxes are still in network-input pixels"
    detections = [d for e in entries for d in e["detections"]]
    assert {d["category_id"] for d in detections} <= {3, 7, 11}
    assert {d["class_name"] for d in detections} <= {"circle", "square", "triangle"}
    drawn = sorted((output.parent / "predictions").glob("*.png"))
    assert [p.name for p in drawn] == ["00000.png", "00001.png", "00002.png"]
    assert Image.open(drawn[1]).size == (160, 120)
