"""Reading object detection annotations (COCO json, YOLO txt) into one record per image.

Both readers return :class:`DetectionAnnotations`: a list of :class:`DetectionRecord` (image path, boxes ``xyxy`` in
absolute pixels of the stored image, contiguous class indices ``0..C-1``), the class names and, for each class
index, its original COCO category id, so predictions can be written back with the ids the dataset uses.

Boxes that extend beyond their image are handled by ``out_of_bounds``: ``"clip"`` (default) clips them to the image
(a box wholly outside is dropped), ``"drop"`` drops them, ``"error"`` raises. Each read warns once with the counts and
an example file. Overshoots of at most 0.01 px (rounding in the source) are clipped silently. Broken annotations (a
box with zero or negative size, NaN, a malformed line, an unknown category, a missing image) raise
:class:`~cvft.errors.DatasetError` naming the file, and for YOLO the line.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from cvft.data.detection._yolo import find_class_names, image_ids, label_path, list_images, read_yolo_file
from cvft.errors import DatasetError

__all__ = ["OUT_OF_BOUNDS_MODES", "DetectionAnnotations", "DetectionRecord", "read_coco", "read_yolo"]

OUT_OF_BOUNDS_MODES: tuple[str, ...] = ("clip", "drop", "error")
"""Values of ``out_of_bounds``: what to do with boxes extending beyond their image."""

_TOLERANCE = 0.01  # px: overshoot treated as rounding and clipped silently
_EXIF_ORIENTATION = 0x0112


class DetectionRecord(NamedTuple):
    """One image and its boxes.

    Attributes:
        path: Image file.
        boxes: ``float32`` array ``(N, 4)``: ``x0, y0, x1, y1`` in pixels of the stored image (``N`` may be 0).
        labels: ``int64`` array ``(N,)`` of class indices ``0..C-1``.
        image_id: Image id (COCO's, or for YOLO the file name's number when all are numeric, else the position).
        width: Image width in pixels.
        height: Image height in pixels.

    Example:
        >>> import numpy as np
        >>> record = DetectionRecord(Path("a.png"), np.zeros((0, 4), np.float32), np.zeros(0, np.int64), 1, 64, 48)
        >>> record.boxes.shape, record.width
        ((0, 4), 64)
    """

    path: Path
    boxes: np.ndarray
    labels: np.ndarray
    image_id: int
    width: int
    height: int


@dataclass
class DetectionAnnotations:
    """Records of a detection dataset with its classes.

    Args:
        records: One record per image, images without boxes included.
        class_names: Class names; index ``i`` is class ``i``.
        category_ids: Original COCO category id of each class index (YOLO: ``0..C-1``).

    Example:
        >>> annotations = DetectionAnnotations([], ["cat", "dog"], [1, 3])
        >>> annotations.num_classes, annotations.id_to_index
        (2, {1: 0, 3: 1})
    """

    records: list[DetectionRecord]
    class_names: list[str]
    category_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.category_ids:
            self.category_ids = list(range(len(self.class_names)))
        if len(self.category_ids) != len(self.class_names):
            raise DatasetError(
                f"{len(self.class_names)} class names but {len(self.category_ids)} category ids; give one id per class."
            )

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    @property
    def id_to_index(self) -> dict[int, int]:
        """Map of original category id to class index."""
        return {category: index for index, category in enumerate(self.category_ids)}

    def __len__(self) -> int:
        return len(self.records)

    def select_classes(self, names: Sequence[str]) -> DetectionAnnotations:
        """Keep only the boxes of ``names``, re-indexed in the order given (a few-class subset of a dataset).

        Args:
            names: Class names to keep; class ``i`` of the result is ``names[i]`` (its original category id kept).

        Returns:
            New annotations with every image, in the same order (those left without boxes are negatives); the
            records keep their paths, sizes and image ids.

        Raises:
            DatasetError: A name is not a class of the dataset, is repeated, or ``names`` is empty.

        Example:
            >>> import numpy as np
            >>> boxes = np.array([[0, 0, 4, 4], [1, 1, 5, 5]], np.float32)
            >>> record = DetectionRecord(Path("a.png"), boxes, np.array([0, 2]), 1, 8, 8)
            >>> subset = DetectionAnnotations([record], ["person", "bicycle", "car"], [1, 2, 3]).select_classes(["car"])
            >>> subset.class_names, subset.category_ids, subset.records[0].labels.tolist()
            (['car'], [3], [0])
        """
        names = list(names)
        unknown = [name for name in names if name not in self.class_names]
        if not names or unknown or len(set(names)) != len(names):
            hints = {name: difflib.get_close_matches(name, self.class_names, n=3) for name in unknown}
            said = "; ".join(f"{name!r} (close: {', '.join(hint) or 'none'})" for name, hint in hints.items())
            raise DatasetError(
                f"classes={names}: "
                + (f"not classes of this dataset: {said}. " if unknown else "give distinct class names. ")
                + f"Its classes are {self.class_names}."
            )
        old_to_new = np.full(self.num_classes, -1, np.int64)
        for new_index, name in enumerate(names):
            old_to_new[self.class_names.index(name)] = new_index
        records = []
        for record in self.records:
            labels = old_to_new[record.labels]
            keep = labels >= 0
            records.append(record._replace(boxes=record.boxes[keep], labels=labels[keep]))
        ids = [self.category_ids[self.class_names.index(name)] for name in names]
        return DetectionAnnotations(records, names, ids)


def read_coco(
    json_path: str | Path,
    image_root: str | Path | None = None,
    out_of_bounds: str = "clip",
    skip_crowd: bool = True,
) -> DetectionAnnotations:
    """Read a COCO instances json (``images``, ``annotations`` with ``bbox [x, y, w, h]`` px, ``categories``).

    Category ids may be non-contiguous: class index ``i`` is the ``i``-th smallest id (kept in ``category_ids``).
    Images listed without annotations become records without boxes. ``iscrowd=1`` annotations (a region of many
    objects) are skipped by default, as COCO evaluation ignores them too.

    Args:
        json_path: The COCO json file.
        image_root: Folder that ``file_name`` entries are relative to. Default: the first of the json's folder,
            ``images/`` next to it, ``<split>/`` or ``images/<split>/`` next to the json's folder (``split`` from
            ``instances_<split>.json``) that holds the first image.
        out_of_bounds: ``"clip"``, ``"drop"`` or ``"error"`` for boxes extending beyond their image.
        skip_crowd: Skip ``iscrowd=1`` annotations; ``False`` keeps them as ordinary boxes.

    Returns:
        The records (in the json's image order), class names and category ids.

    Raises:
        DatasetError: Unreadable json, a missing image, an unknown category or image id, a degenerate box, or an
            out-of-bounds box with ``out_of_bounds="error"``.

    Example:
        >>> import json, tempfile
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (40, 30)).save(root / "a.png")
        >>> coco = {"images": [{"id": 5, "file_name": "a.png", "width": 40, "height": 30}],
        ...         "annotations": [{"id": 1, "image_id": 5, "category_id": 9, "bbox": [2, 3, 10, 5]}],
        ...         "categories": [{"id": 9, "name": "cat"}, {"id": 2, "name": "dog"}]}
        >>> _ = (root / "coco.json").write_text(json.dumps(coco))
        >>> annotations = read_coco(root / "coco.json")
        >>> annotations.class_names, annotations.category_ids
        (['dog', 'cat'], [2, 9])
        >>> annotations.records[0].boxes.tolist(), annotations.records[0].labels.tolist()
        ([[2.0, 3.0, 12.0, 8.0]], [1])
    """
    _check_mode(out_of_bounds)
    json_path = Path(json_path)
    data = _load_coco_json(json_path)
    categories = sorted(data["categories"], key=lambda c: int(c["id"]))
    category_ids = [int(c["id"]) for c in categories]
    if len(set(category_ids)) != len(category_ids):
        raise DatasetError(f"{json_path} lists a category id twice in 'categories'. Give each category one id.")
    id_to_index = {category: index for index, category in enumerate(category_ids)}
    images = data["images"]
    root = _coco_image_root(json_path, images, image_root)

    per_image: dict[int, list[tuple[list[float], int]]] = {int(image["id"]): [] for image in images}
    for annotation in data["annotations"]:
        if skip_crowd and annotation.get("iscrowd", 0):
            continue
        where = f"{json_path}, annotation id {annotation.get('id')}"
        image_id = int(annotation.get("image_id", -1))
        if image_id not in per_image:
            raise DatasetError(f"{where}: image_id {image_id} is not in 'images'. Add the image or drop the entry.")
        category = annotation.get("category_id")
        if category not in id_to_index:
            raise DatasetError(
                f"{where}: category_id {category} is not in 'categories' (ids {category_ids}). Add the category "
                "or fix the annotation."
            )
        x, y, w, h = _coco_bbox(annotation.get("bbox"), where)
        per_image[image_id].append(([x, y, x + w, y + h], id_to_index[category]))

    records, report = [], _OutOfBounds(out_of_bounds)
    for image in images:
        path = root / image["file_name"]
        if not path.is_file():
            raise DatasetError(
                f"Image {path} listed in {json_path} does not exist. Pass image_root= (the folder that 'file_name' "
                "is relative to), or remove the image from the json."
            )
        width, height = (int(image["width"]), int(image["height"])) if "width" in image else image_size(path)
        entries = per_image[int(image["id"])]
        boxes = np.array([b for b, _ in entries], np.float32).reshape(-1, 4)
        labels = np.array([c for _, c in entries], np.int64)
        boxes, labels = report.fit(boxes, labels, width, height, path)
        records.append(DetectionRecord(path, boxes, labels, int(image["id"]), width, height))
    report.warn()
    return DetectionAnnotations(records, [str(c.get("name", c["id"])) for c in categories], category_ids)


def read_yolo(
    images: str | Path,
    labels_dir: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    out_of_bounds: str = "clip",
) -> DetectionAnnotations:
    r"""Read YOLO (ultralytics) labels: one ``<image>.txt`` per image with ``cls cx cy w h`` lines in 0..1.

    A line with more than 5 numbers is a segment polygon (``cls x1 y1 x2 y2 ...``); its box is the polygon's
    bounding box. A missing or empty label file means an image without boxes. Image sizes come from the file
    headers (EXIF orientation applied, as when the image is loaded).

    Args:
        images: Folder of images (searched recursively), or a ``.txt`` file listing image paths (relative ones are
            relative to the list file's folder).
        labels_dir: Folder of label files mirroring ``images``. Default (ultralytics' rule): each image's path with
            its last ``images`` folder replaced by ``labels`` (``images/train2017/a.jpg`` ->
            ``labels/train2017/a.txt``), or the ``.txt`` next to the image when the path has no ``images`` folder.
        class_names: Class names in class-index order. Default: ``names:`` of a ``data.yaml`` / ``config.yaml`` /
            ``dataset.yaml`` (dict or list), else the lines of a ``classes.txt``, found in the images' or labels'
            folder or up to three folders above.
        out_of_bounds: ``"clip"``, ``"drop"`` or ``"error"`` for boxes extending beyond their image.

    Returns:
        The records (sorted by image path), class names and category ids ``0..C-1``.

    Raises:
        DatasetError: No images, no label files at all, no class names, a malformed line, a class index out of
            range, a degenerate box, or an out-of-bounds box with ``out_of_bounds="error"``.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "images").mkdir(); (root / "labels").mkdir()
        >>> Image.new("RGB", (40, 20)).save(root / "images" / "a.png")
        >>> _ = (root / "labels" / "a.txt").write_text("1 0.5 0.5 0.5 0.5\n")
        >>> annotations = read_yolo(root / "images", class_names=["cat", "dog"])
        >>> annotations.records[0].boxes.tolist(), annotations.records[0].labels.tolist()
        ([[10.0, 5.0, 30.0, 15.0]], [1])
    """
    _check_mode(out_of_bounds)
    images = Path(images)
    files = list_images(images)
    label_files = [label_path(f, images, labels_dir) for f in files]
    if not any(p.is_file() for p in label_files):
        raise DatasetError(
            f"None of the {len(files)} images of {images} has a label file (looked for e.g. {label_files[0]}). "
            "Pass labels_dir= (the folder of YOLO .txt files)."
        )
    names = list(class_names) if class_names is not None else find_class_names(images, label_files[0])
    ids = image_ids(files)
    records, report = [], _OutOfBounds(out_of_bounds)
    for path, label_file, image_id in zip(files, label_files, ids, strict=True):
        width, height = image_size(path)
        boxes, labels = read_yolo_file(label_file, len(names), width, height)
        boxes, labels = report.fit(boxes, labels, width, height, path)
        records.append(DetectionRecord(path, boxes, labels, image_id, width, height))
    report.warn()
    return DetectionAnnotations(records, names, list(range(len(names))))


def image_size(path: str | Path) -> tuple[int, int]:
    """Return ``(width, height)`` of an image from its header, after EXIF orientation (as ``load_image`` sees it).

    Args:
        path: Image file.

    Returns:
        Width and height in pixels.

    Raises:
        DatasetError: The file is missing or not an image.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> path = Path(tempfile.mkdtemp()) / "a.png"
        >>> Image.new("RGB", (7, 3)).save(path)
        >>> image_size(path)
        (7, 3)
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except FileNotFoundError as error:
        raise DatasetError(f"Image {path} does not exist. Restore it or remove it (and its labels).") from error
    except Exception as error:  # Pillow raises many types for broken files
        raise DatasetError(f"{path} is not a readable image ({error}). Re-export or delete it.") from error
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


# --- COCO ---------------------------------------------------------------------------------------------------------


def _load_coco_json(json_path: Path) -> dict[str, Any]:
    if not json_path.is_file():
        raise DatasetError(f"COCO annotation file {json_path} does not exist. Check the path.")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise DatasetError(f"{json_path} is not valid JSON ({error}). Re-export the annotations.") from error
    missing = [key for key in ("images", "categories") if not isinstance(data, dict) or key not in data]
    if missing:
        raise DatasetError(
            f"{json_path} has no {' / '.join(repr(k) for k in missing)} list; a COCO instances file needs "
            "'images', 'annotations' and 'categories'."
        )
    data.setdefault("annotations", [])
    return data


def _coco_bbox(bbox: Any, where: str) -> tuple[float, float, float, float]:
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError) as error:
        raise DatasetError(f"{where}: bbox {bbox!r} is not 4 numbers [x, y, width, height].") from error
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise DatasetError(
            f"{where}: bbox {bbox} is degenerate (width and height must be finite and > 0). Fix or remove it."
        )
    return x, y, w, h


def _coco_image_root(json_path: Path, images: list[dict], image_root: str | Path | None) -> Path:
    if image_root is not None:
        return Path(image_root)
    folder = json_path.parent
    candidates = [folder, folder / "images"]
    split = re.sub(r"^instances_", "", json_path.stem)
    candidates += [folder.parent / split, folder.parent / "images" / split]
    if not images:
        return folder
    first = images[0]["file_name"]
    for candidate in candidates:
        if (candidate / first).is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise DatasetError(
        f"Image {first!r} listed in {json_path} was not found in {tried}. Pass image_root= (the folder that "
        "'file_name' is relative to)."
    )


# --- shared -------------------------------------------------------------------------------------------------------


def _check_mode(out_of_bounds: str) -> None:
    if out_of_bounds not in OUT_OF_BOUNDS_MODES:
        choices = ", ".join(OUT_OF_BOUNDS_MODES)
        raise DatasetError(f"out_of_bounds={out_of_bounds!r} is unknown; choose one of {choices}.")


class _OutOfBounds:
    """Applies an ``out_of_bounds`` mode to each image's boxes and counts what it did, for one summary warning."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.boxes = self.images = self.outside = 0
        self.example: Path | None = None

    def fit(
        self, boxes: np.ndarray, labels: np.ndarray, width: int, height: int, path: Path
    ) -> tuple[np.ndarray, np.ndarray]:
        limits = np.array([0, 0, width, height], np.float32)
        over = (boxes[:, :2] < -_TOLERANCE).any(1) | (boxes[:, 2:] > limits[2:] + _TOLERANCE).any(1)
        clipped = np.clip(boxes, 0, np.tile(limits[2:], 2))
        if not over.any():
            return clipped, labels
        if self.mode == "error":
            first = boxes[over][0].round(2).tolist()
            raise DatasetError(
                f"{path}: box {first} extends beyond the {width}x{height} image ({int(over.sum())} such boxes). Fix "
                "the annotations, or pass out_of_bounds='clip' or 'drop'."
            )
        self.boxes += int(over.sum())
        self.images += 1
        self.example = self.example or path
        if self.mode == "drop":
            return clipped[~over], labels[~over]
        keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        self.outside += int((~keep).sum())
        return clipped[keep], labels[keep]

    def warn(self) -> None:
        if not self.boxes:
            return
        done = "were dropped" if self.mode == "drop" else "were clipped to it"
        outside = f" ({self.outside} wholly outside it were dropped)" if self.outside else ""
        warnings.warn(
            f"{self.boxes} boxes in {self.images} images extended beyond the image and {done}{outside}, e.g. in "
            f"{self.example}. Pass out_of_bounds='error' to stop on them instead.",
            UserWarning,
            stacklevel=3,
        )
