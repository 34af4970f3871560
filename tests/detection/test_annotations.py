from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cvft.data.detection import DetectionRecord, read_coco, read_yolo, write_shapes_detection
from cvft.errors import DatasetError

ASSETS = Path(__file__).resolve().parents[3] / "shared" / "assets"
COCO128 = ASSETS / "coco128_detection"


def _assert_same_boxes(a: DetectionRecord, b: DetectionRecord, tolerance: float) -> None:
    """Each box of ``a`` has its own box of the same label in ``b`` within ``tolerance`` px (order-free)."""
    assert a.boxes.shape == b.boxes.shape, a.path
    assert sorted(a.labels.tolist()) == sorted(b.labels.tolist()), a.path
    unused = list(range(len(b.boxes)))
    for box, label in zip(a.boxes, a.labels, strict=True):
        candidates = [j for j in unused if b.labels[j] == label]
        distances = [np.abs(b.boxes[j] - box).max() for j in candidates]
        best = int(np.argmin(distances))
        assert distances[best] <= tolerance, (a.path, box, b.boxes[candidates[best]])
        unused.remove(candidates[best])


def _assert_same_targets(a, b, tolerance: float) -> None:
    assert a.class_names == b.class_names
    by_path = {r.path.resolve(): r for r in b.records}
    assert set(by_path) == {r.path.resolve() for r in a.records}
    for record in a.records:
        other = by_path[record.path.resolve()]
        assert (record.width, record.height) == (other.width, other.height)
        _assert_same_boxes(record, other, tolerance)


def _write_coco(root: Path, annotations: list[dict], size=(40, 30), categories=(3, 7), **image) -> Path:
    Image.new("RGB", size).save(root / "a.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": size[0], "height": size[1], **image}],
        "annotations": [{"id": i + 1, "image_id": 1, "iscrowd": 0, **a} for i, a in enumerate(annotations)],
        "categories": [{"id": c, "name": f"c{c}"} for c in categories],
    }
    (root / "coco.json").write_text(json.dumps(coco))
    return root / "coco.json"


def _write_yolo(root: Path, lines: str, size=(40, 30), names=("a", "b", "c")) -> Path:
    (root / "images").mkdir(exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    Image.new("RGB", size).save(root / "images" / "a.png")
    (root / "labels" / "a.txt").write_text(lines)
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    return root / "images"


# --- the generated shapes set ----------------------------------------------------------------------------------


def test_shapes_boxes_are_tight_around_the_bright_shape_pixels(shapes_root):
    coco = json.loads((shapes_root / "annotations.json").read_text())
    per_image: dict[int, list] = {}
    for a in coco["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a["bbox"])
    assert {c["id"] for c in coco["categories"]} == {3, 7, 11}
    empty = [im for im in coco["images"] if im["id"] not in per_image]
    assert len(empty) == round(0.1 * len(coco["images"]))
    for image in coco["images"]:
        shape_pixels = np.asarray(Image.open(shapes_root / "images" / image["file_name"])).max(-1) > 145
        covered = np.zeros_like(shape_pixels)
        for x, y, w, h in per_image.get(image["id"], []):
            window = shape_pixels[y : y + h, x : x + w]
            assert window[0].any() and window[-1].any() and window[:, 0].any() and window[:, -1].any()
            covered[y : y + h, x : x + w] = True
        assert not (shape_pixels & ~covered).any()  # no bright pixel outside the boxes


def test_shapes_rerun_is_cheap_and_other_arguments_are_refused(shapes_root):
    marker_time = (shapes_root / "annotations.json").stat().st_mtime_ns
    assert write_shapes_detection(shapes_root) == shapes_root
    assert (shapes_root / "annotations.json").stat().st_mtime_ns == marker_time
    with pytest.raises(DatasetError, match="other arguments"):
        write_shapes_detection(shapes_root, seed=1)


def test_coco_and_yolo_give_the_same_targets_on_shapes(shapes_root):
    coco = read_coco(shapes_root / "annotations.json")
    yolo = read_yolo(shapes_root / "images")  # class names from data.yaml
    assert len(coco.records) == len(yolo.records) == 64
    assert sum(len(r.boxes) == 0 for r in coco.records) == 6
    _assert_same_targets(coco, yolo, tolerance=1e-3)


def test_non_contiguous_category_ids_map_to_indices_and_back(shapes_root):
    annotations = read_coco(shapes_root / "annotations.json")
    assert annotations.category_ids == [3, 7, 11]
    assert annotations.class_names == ["circle", "square", "triangle"]
    raw = json.loads((shapes_root / "annotations.json").read_text())
    expected: dict[int, list[int]] = {}
    for a in raw["annotations"]:
        expected.setdefault(a["image_id"], []).append(a["category_id"])
    for record in annotations.records:
        assert record.labels.dtype == np.int64 and record.boxes.dtype == np.float32
        assert set(record.labels.tolist()) <= {0, 1, 2}
        back = [annotations.category_ids[i] for i in record.labels]
        assert back == expected.get(record.image_id, [])


@pytest.mark.assets
@pytest.mark.skipif(not COCO128.is_dir(), reason=f"needs {COCO128} (not shipped)")
def test_coco_and_yolo_give_the_same_targets_on_coco128():
    images = COCO128 / "images" / "train2017"
    coco = read_coco(COCO128 / "annotations_coco" / "instances_train2017.json", image_root=images)
    yolo = read_yolo(images)  # labels/train2017 and config.yaml names found by the ultralytics rules
    assert len(coco.records) == 128 and coco.num_classes == 80
    assert coco.category_ids[-1] == 90  # non-contiguous COCO ids
    assert sum(len(r.boxes) for r in coco.records) == 929  # 939 minus 10 crowd boxes
    _assert_same_targets(coco, yolo, tolerance=1e-3)


# --- YOLO specifics --------------------------------------------------------------------------------------------


def test_yolo_missing_label_file_is_an_image_without_boxes(shapes_root, tmp_path):
    images = _write_yolo(tmp_path, "0 0.5 0.5 0.5 0.5\n")
    Image.new("RGB", (8, 8)).save(images / "b.png")
    records = read_yolo(images).records
    assert [len(r.boxes) for r in records] == [1, 0]
    assert records[1].boxes.shape == (0, 4) and records[1].labels.shape == (0,)


@pytest.mark.parametrize(
    ("file_name", "text", "expected"),
    [
        ("data.yaml", "names:\n  0: x\n  1: y\n", ["x", "y"]),
        ("config.yaml", "names: [p, q, r]\n", ["p", "q", "r"]),
        ("classes.txt", "u\nv\n", ["u", "v"]),
    ],
)
def test_yolo_class_names_come_from_yaml_or_classes_txt(tmp_path, file_name, text, expected):
    images = _write_yolo(tmp_path, "0 0.5 0.5 0.5 0.5\n")
    (tmp_path / "classes.txt").unlink()
    (tmp_path / file_name).write_text(text)
    assert read_yolo(images).class_names == expected


def test_yolo_without_class_names_or_labels_is_refused(tmp_path):
    images = _write_yolo(tmp_path, "0 0.5 0.5 0.5 0.5\n")
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(DatasetError, match="class_names="):
        read_yolo(images)
    with pytest.raises(DatasetError, match="labels_dir="):
        read_yolo(images, labels_dir=tmp_path / "nowhere", class_names=["a"])


def test_yolo_polygon_line_gives_its_bounding_box(tmp_path):
    images = _write_yolo(tmp_path, "2 0.1 0.2 0.5 0.1 0.3 0.9\n")
    record = read_yolo(images).records[0]
    np.testing.assert_allclose(record.boxes, [[4, 3, 20, 27]], atol=1e-4)
    assert record.labels.tolist() == [2]


# --- boxes beyond the image ------------------------------------------------------------------------------------

_OOB = [
    {"category_id": 3, "bbox": [2, 2, 10, 10]},  # inside
    {"category_id": 7, "bbox": [30, 20, 20, 5]},  # beyond the right edge: x1 = 50 > 40
    {"category_id": 3, "bbox": [45, 5, 5, 5]},  # wholly outside
]


def test_out_of_bounds_clip_clips_and_drops_boxes_wholly_outside(tmp_path):
    with pytest.warns(UserWarning, match=r"2 boxes in 1 images .* clipped .*1 wholly outside.*a\.png"):
        record = read_coco(_write_coco(tmp_path, _OOB)).records[0]
    np.testing.assert_array_equal(record.boxes, [[2, 2, 12, 12], [30, 20, 40, 25]])
    assert record.labels.tolist() == [0, 1]


def test_out_of_bounds_drop_and_error(tmp_path):
    json_path = _write_coco(tmp_path, _OOB)
    with pytest.warns(UserWarning, match=r"2 boxes in 1 images .* dropped"):
        record = read_coco(json_path, out_of_bounds="drop").records[0]
    np.testing.assert_array_equal(record.boxes, [[2, 2, 12, 12]])
    with pytest.raises(DatasetError, match=r"a\.png.*extends beyond the 40x30 image"):
        read_coco(json_path, out_of_bounds="error")


def test_out_of_bounds_yolo_clip_counts_and_in_bounds_reads_do_not_warn(tmp_path, recwarn):
    images = _write_yolo(tmp_path, "0 0.95 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2\n")
    with pytest.warns(UserWarning, match="1 boxes in 1 images"):
        record = read_yolo(images).records[0]
    np.testing.assert_allclose(record.boxes[0], [34, 12, 40, 18], atol=1e-4)
    (tmp_path / "labels" / "a.txt").write_text("1 0.5 0.5 0.2 0.2\n")
    read_yolo(images)
    assert not [w for w in recwarn.list if "beyond" in str(w.message)]


# --- broken annotations ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bbox", [[1, 1, 0, 5], [1, 1, 5, -2], [1, float("nan"), 5, 5], [1, 2, 3]])
def test_coco_degenerate_box_is_refused_naming_the_file(tmp_path, bbox):
    json_path = _write_coco(tmp_path, [{"category_id": 3, "bbox": [1, 1, 4, 4]}, {"category_id": 3, "bbox": bbox}])
    with pytest.raises(DatasetError, match=r"coco\.json, annotation id 2"):
        read_coco(json_path)


@pytest.mark.parametrize(
    "line", ["0 0.5 0.5 0 0.2", "0 0.5 0.5 0.2 -0.1", "0 nan 0.5 0.2 0.2", "0 0.5 0.5", "x 0.5 0.5 0.2 0.2"]
)
def test_yolo_degenerate_or_malformed_line_is_refused_naming_file_and_line(tmp_path, line):
    images = _write_yolo(tmp_path, f"1 0.5 0.5 0.1 0.1\n{line}\n")
    with pytest.raises(DatasetError, match=r"a\.txt, line 2"):
        read_yolo(images)


def test_missing_image_is_refused_naming_it(tmp_path):
    json_path = _write_coco(tmp_path, [])
    coco = json.loads(json_path.read_text())
    coco["images"].append({"id": 2, "file_name": "gone.png", "width": 4, "height": 4})
    json_path.write_text(json.dumps(coco))
    with pytest.raises(DatasetError, match=r"gone\.png.*coco\.json.*image_root="):
        read_coco(json_path)
    images = _write_yolo(tmp_path, "0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "list.txt").write_text("images/a.png\nimages/gone.png\n")
    with pytest.raises(DatasetError, match=r"list\.txt, line 2.*gone\.png"):
        read_yolo(tmp_path / "list.txt")
    assert len(read_yolo(images).records) == 1


def test_unknown_category_is_refused_naming_the_file(tmp_path):
    json_path = _write_coco(tmp_path, [{"category_id": 99, "bbox": [1, 1, 4, 4]}])
    with pytest.raises(DatasetError, match=r"coco\.json.*category_id 99 is not in 'categories'"):
        read_coco(json_path)
    images = _write_yolo(tmp_path, "0 0.5 0.5 0.2 0.2\n3 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DatasetError, match=r"a\.txt, line 2: class 3"):
        read_yolo(images)


def test_crowd_boxes_are_skipped_unless_asked(tmp_path):
    json_path = _write_coco(tmp_path, [{"category_id": 3, "bbox": [1, 1, 4, 4], "iscrowd": 1}])
    assert read_coco(json_path).records[0].boxes.shape == (0, 4)
    assert read_coco(json_path, skip_crowd=False).records[0].boxes.shape == (1, 4)
