"""DetectionPredictionWriter on hand-made detector outputs: JSON content, rescaling, threshold, ids, drawing."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cvft import atomic
from cvft.callbacks import DetectionPredictionWriter
from cvft.callbacks.detection_predictions import box_colour, boxes_to_original


def _trainer(tmp_path: Path, datamodule=None, world_size: int = 1, rank: int = 0) -> SimpleNamespace:
    return SimpleNamespace(
        datamodule=datamodule, world_size=world_size, global_rank=rank, loggers=[], default_root_dir=str(tmp_path)
    )


def _module(class_names=("circle", "square", "triangle"), category_ids=(3, 7, 11)) -> SimpleNamespace:
    return SimpleNamespace(class_names=list(class_names), category_ids=list(category_ids) if category_ids else None)


def _images(tmp_path: Path) -> tuple[Path, Path]:
    first, second = tmp_path / "wide.png", tmp_path / "empty.png"
    Image.new("RGB", (200, 150), (90, 90, 90)).save(first)
    Image.new("RGB", (64, 64), (90, 90, 90)).save(second)
    return first, second


def _batches(first: Path, second: Path) -> list[dict]:
    """Two batches, the second image first (the writer sorts by index); sizes as after a 64 px letterbox."""
    return [
        {
            "boxes": [torch.zeros(0, 4)],
            "scores": [torch.zeros(0)],
            "labels": [torch.zeros(0, dtype=torch.int64)],
            "metas": [{"index": 1, "path": str(second), "orig_size": (64, 64), "size": (64, 64)}],
        },
        {
            "boxes": [torch.tensor([[16.0, 8.0, 32.0, 24.0], [0.0, 0.0, 10.0, 10.0], [40.0, 30.0, 63.0, 60.0]])],
            "scores": [torch.tensor([0.5, 0.9, 0.2])],
            "labels": [torch.tensor([2, 0, 1])],
            "metas": [{"index": 0, "path": str(first), "orig_size": (150, 200), "size": (64, 64)}],
        },
    ]


def test_json_content_is_exact_sorted_by_image_and_score(tmp_path):
    first, second = _images(tmp_path)
    writer = DetectionPredictionWriter(score_threshold=0.3)
    writer.write_on_epoch_end(_trainer(tmp_path), _module(), [_batches(first, second)], None)
    assert writer.path == tmp_path / "predictions.json"
    assert json.loads(writer.path.read_text()) == [
        {
            "file": str(first),
            "width": 200,
            "height": 150,
            "detections": [
                {"box": [0.0, 0.0, 31.25, 31.25], "score": 0.9, "label": 0, "class_name": "circle", "category_id": 3},
                {
                    "box": [50.0, 25.0, 100.0, 75.0],
                    "score": 0.5,
                    "label": 2,
                    "class_name": "triangle",
                    "category_id": 11,
                },
            ],
        },
        {"file": str(second), "width": 64, "height": 64, "detections": []},
    ]
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "predictions").exists()


def test_boxes_go_back_to_original_pixels_and_are_clipped():
    box = torch.tensor([[16.0, 8.0, 32.0, 24.0]])
    # letterbox 200x150 -> 64x48 padded to 64x64: a pure scale by 200/64, whichever size the meta records
    expected = torch.tensor([[50.0, 25.0, 100.0, 75.0]])
    assert torch.allclose(boxes_to_original(box, (64, 64), (150, 200)), expected)
    assert torch.allclose(boxes_to_original(box, (48, 64), (150, 200)), expected)
    # a plain resize scales each axis on its own
    stretched = boxes_to_original(box, (64, 64), (150, 200), keep_ratio=False)
    assert torch.allclose(stretched, torch.tensor([[50.0, 18.75, 100.0, 56.25]]))
    # boxes reaching into the padding end at the image border
    clipped = boxes_to_original(torch.tensor([[-3.0, 40.0, 70.0, 63.0]]), (64, 64), (150, 200))
    assert torch.allclose(clipped, torch.tensor([[0.0, 125.0, 200.0, 150.0]]))


def test_keep_ratio_false_on_the_datamodule_rescales_per_axis(tmp_path):
    first, second = _images(tmp_path)
    datamodule = SimpleNamespace(hparams={"keep_ratio": False})
    writer = DetectionPredictionWriter(score_threshold=0.45)
    writer.write_on_epoch_end(_trainer(tmp_path, datamodule), _module(), _batches(first, second), None)
    detections = json.loads(writer.path.read_text())[0]["detections"]
    assert [d["box"] for d in detections] == [[0.0, 0.0, 31.25, 23.44], [50.0, 18.75, 100.0, 56.25]]


@pytest.mark.parametrize("threshold, kept", [(0.0, 3), (0.5, 2), (0.9, 1), (0.95, 0)])
def test_score_threshold_keeps_scores_at_or_above_it(tmp_path, threshold, kept):
    first, second = _images(tmp_path)
    entries = DetectionPredictionWriter(score_threshold=threshold).entries(_batches(first, second))
    assert len(entries[0]["detections"]) == kept
    assert all(d["score"] >= threshold for d in entries[0]["detections"])


def test_category_ids_come_from_the_module_else_the_datamodule_else_the_index(tmp_path):
    first, second = _images(tmp_path)
    datamodule = SimpleNamespace(category_ids=[1, 5, 90], class_names=["a", "b", "c"])
    for module_ids, expected in (([3, 7, 11], {3, 11}), (None, {1, 90})):
        writer = DetectionPredictionWriter(output=str(tmp_path / "out.json"))
        writer.write_on_epoch_end(
            _trainer(tmp_path, datamodule), _module(category_ids=module_ids), _batches(first, second), None
        )
        assert {d["category_id"] for d in json.loads(writer.path.read_text())[0]["detections"]} == expected
    entries = DetectionPredictionWriter().entries(_batches(first, second))
    assert [(d["label"], d["category_id"], d["class_name"]) for d in entries[0]["detections"]] == [
        (0, 0, "0"),
        (2, 2, "2"),
    ]


def test_write_is_atomic_and_ranks_write_their_own_file(tmp_path, monkeypatch):
    first, second = _images(tmp_path)
    target = tmp_path / "predictions.json"
    target.write_text("[]\n")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)  # the writer writes through cvft.atomic
    with pytest.raises(OSError, match="disk full"):
        DetectionPredictionWriter().write_on_epoch_end(_trainer(tmp_path), _module(), _batches(first, second), None)
    assert target.read_text() == "[]\n", "a failed write must leave the previous file whole"
    monkeypatch.undo()

    writer = DetectionPredictionWriter()
    writer.write_on_epoch_end(_trainer(tmp_path, world_size=2, rank=1), _module(), _batches(first, second), None)
    assert writer.path == tmp_path / "predictions.rank1.json"
    assert len(json.loads(writer.path.read_text())) == 2


def test_drawn_png_has_the_class_colour_on_the_box_edge(tmp_path):
    first, second = _images(tmp_path)
    writer = DetectionPredictionWriter(score_threshold=0.3, draw=True, line_width=2)
    writer.write_on_epoch_end(_trainer(tmp_path), _module(), [_batches(first, second)], None)
    assert [p.name for p in writer.drawings] == ["wide.png", "empty.png"]
    assert all(p.parent == tmp_path / "predictions" for p in writer.drawings)
    drawn = np.asarray(Image.open(tmp_path / "predictions" / "wide.png").convert("RGB"))
    assert drawn.shape == (150, 200, 3)
    # the triangle box [50, 25, 100, 75]: its bottom and right edges in the triangle colour, its inside untouched
    assert tuple(drawn[75, 75]) == box_colour(2)
    assert tuple(drawn[50, 100]) == box_colour(2)
    assert tuple(drawn[50, 75]) == (90, 90, 90)
    untouched = np.asarray(Image.open(tmp_path / "predictions" / "empty.png").convert("RGB"))
    assert (untouched == 90).all()
