"""YOLO (ultralytics) label files: finding images, their label files and class names, parsing lines."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import yaml

from cvft.data.io import is_image_file
from cvft.errors import DatasetError

__all__ = ["CONFIG_NAMES", "find_class_names", "image_ids", "label_path", "list_images", "read_yolo_file", "yaml_names"]

CONFIG_NAMES = ("data.yaml", "config.yaml", "dataset.yaml")
"""Dataset yaml files searched for ``names:``, in this order."""


def list_images(images: Path) -> list[Path]:
    """Images of a folder (recursive, sorted) or of a ``.txt`` list (relative paths: from the list's folder)."""
    if images.is_file() and images.suffix.lower() == ".txt":
        lines = [line.strip() for line in images.read_text(encoding="utf-8").splitlines() if line.strip()]
        files = [Path(line) if Path(line).is_absolute() else (images.parent / line).resolve() for line in lines]
        for number, path in enumerate(files, 1):
            if not path.is_file():
                raise DatasetError(f"{images}, line {number}: image {path} does not exist. Fix or remove the line.")
        return files
    if not images.is_dir():
        raise DatasetError(f"Image folder {images} does not exist. Check the path.")
    files = sorted(p for p in images.rglob("*") if p.is_file() and is_image_file(p) and not p.name.startswith("."))
    if not files:
        raise DatasetError(f"No images found in {images}. Check the path (images go in e.g. images/train).")
    return files


def label_path(image: Path, images: Path, labels_dir: str | Path | None) -> Path:
    """The label file of ``image``: mirrored under ``labels_dir``, else by ultralytics' ``images`` -> ``labels``."""
    if labels_dir is not None:
        if images.is_dir():
            return (Path(labels_dir) / image.relative_to(images)).with_suffix(".txt")
        return Path(labels_dir) / f"{image.stem}.txt"
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def find_class_names(images: Path, label_file: Path) -> list[str]:
    """Class names from a dataset yaml or ``classes.txt`` in or up to three folders above the images / labels."""
    start = images.parent if images.is_file() else images
    folders: list[Path] = []
    for base in (start, label_file.parent):
        folders += [base, *list(base.resolve().parents)[:3]]
    for folder in dict.fromkeys(folders):
        for name in CONFIG_NAMES:
            if (folder / name).is_file():
                names = yaml_names(folder / name)
                if names is not None:
                    return names
        if (folder / "classes.txt").is_file():
            lines = (folder / "classes.txt").read_text(encoding="utf-8").splitlines()
            return [line.strip() for line in lines if line.strip()]
    raise DatasetError(
        f"No class names for the YOLO labels of {images}: no data.yaml / config.yaml with 'names:' nor classes.txt "
        "in its folder or above. Pass class_names=[...] (in class-index order)."
    )


def yaml_names(path: Path) -> list[str] | None:
    """``names:`` of a dataset yaml (dict ``{0: name}`` or list) as a list, or ``None`` when it has none."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise DatasetError(f"{path} is not valid YAML ({error}). Fix it or pass class_names=[...].") from error
    names = data.get("names") if isinstance(data, dict) else None
    if names is None:
        return None
    if isinstance(names, dict):
        indices = sorted(int(k) for k in names)
        if indices != list(range(len(indices))):
            raise DatasetError(f"'names' in {path} must have the keys 0..{len(indices) - 1}, got {indices}.")
        return [str(names[k] if k in names else names[str(k)]) for k in indices]
    return [str(n) for n in names]


def image_ids(files: list[Path]) -> list[int]:
    """Image ids: the file names' numbers when all are distinct numbers (COCO-style names), else positions."""
    if all(f.stem.isdigit() for f in files):
        ids = [int(f.stem) for f in files]
        if len(set(ids)) == len(ids):
            return ids
    return list(range(len(files)))


def read_yolo_file(path: Path, num_classes: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (``xyxy`` px) and labels of one label file (missing: none); malformed lines raise naming the line."""
    boxes, labels = [], []
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            values = [float(v) for v in line.split()]
        except ValueError:
            values = []
        if len(values) < 5 or (len(values) > 5 and len(values) % 2 == 0) or not all(map(math.isfinite, values)):
            raise DatasetError(f"{where}: {line.strip()!r} is not 'class cx cy w h' (numbers in 0..1). Fix the line.")
        cls = values[0]
        if cls != int(cls) or not 0 <= cls < num_classes:
            raise DatasetError(
                f"{where}: class {line.split()[0]} is not an index into the {num_classes} class names. Fix the line "
                "or the class names (data.yaml 'names:' / class_names=)."
            )
        if len(values) == 5:
            cx, cy, w, h = values[1:]
            box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        else:
            xs, ys = values[1::2], values[2::2]
            box = [min(xs), min(ys), max(xs), max(ys)]
        if box[2] <= box[0] or box[3] <= box[1]:
            raise DatasetError(f"{where}: the box has zero or negative width / height. Fix or remove the line.")
        boxes.append([box[0] * width, box[1] * height, box[2] * width, box[3] * height])
        labels.append(int(cls))
    return np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64)
