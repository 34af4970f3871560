"""A generated object detection set: coloured circles, squares and triangles with exact boxes.

Offline, deterministic and small, for tests, demos and tutorials. Every image is ``image_size`` wide and either
``image_size`` or three quarters of it high (so letterboxing is exercised), with a dark background (noise or a
gradient, every channel at most 120) and 0-3 non-overlapping bright shapes (their brightest channel at least 170,
so a shape's pixels are told from the background by ``image.max(axis=-1) > 145``). Shapes are drawn without
anti-aliasing and each box is the tight box of the shape's pixels, ``[x0, y0, x1, y1)`` in pixel edges.

Classes ``circle``, ``square``, ``triangle`` carry non-contiguous COCO category ids (``3, 7, 11`` by default) so
that the id mapping is exercised too. The output folder holds the same annotations in both common formats::

    out/
      images/00000.png ...
      annotations.json        COCO: images, annotations (bbox [x, y, w, h] px), categories
      labels/00000.txt ...    YOLO: "cls cx cy w h" normalised, cls 0..2 (empty file: no objects)
      data.yaml               ultralytics: path, train (train.txt), val (val.txt), names
      train.txt, val.txt      image lists of a seeded 80 / 20 split
      classes.txt             one class name per line
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cvft.atomic import write_text_atomic
from cvft.data.demo import already_written
from cvft.errors import DatasetError

__all__ = ["SHAPE_CLASSES", "write_shapes_detection"]

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle")
"""Class names of :func:`write_shapes_detection`, in class-index order."""

_MARKER = ".cvft-shapes.json"
_MAX_SHAPES = 3
_VAL_SHARE = 0.2


def write_shapes_detection(
    out: str | Path,
    num_images: int = 64,
    image_size: int = 96,
    seed: int = 0,
    category_ids: Sequence[int] = (3, 7, 11),
    empty_fraction: float = 0.1,
) -> Path:
    """Write the generated shapes detection set (COCO json, YOLO labels and ``data.yaml``) into ``out``.

    Args:
        out: Output folder; must be absent, empty, or a folder this function wrote with the same arguments (then
            it returns at once).
        num_images: Number of images.
        image_size: Image width in pixels (height: ``image_size`` or ``3 * image_size // 4``); at least 32.
        seed: Seed of everything random (backgrounds, shapes, colours, the train / val lists).
        category_ids: COCO category ids of ``circle``, ``square``, ``triangle`` (distinct positive integers,
            ascending so that class index ``i`` is id ``category_ids[i]``).
        empty_fraction: Share of images without any shape.

    Returns:
        ``out`` as a ``Path``.

    Raises:
        DatasetError: Bad arguments, or ``out`` holds other files.

    Example:
        >>> import tempfile
        >>> root = write_shapes_detection(Path(tempfile.mkdtemp()) / "shapes", num_images=4, image_size=48)
        >>> sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
        ['annotations.json', 'classes.txt', 'data.yaml', 'images', 'labels', 'train.txt', 'val.txt']
    """
    ids = [int(i) for i in category_ids]
    if len(ids) != len(SHAPE_CLASSES) or sorted(set(ids)) != ids or ids[0] < 1:
        raise DatasetError(f"category_ids must be 3 distinct ascending positive integers, got {list(category_ids)}.")
    if num_images < 1 or image_size < 32 or not 0.0 <= empty_fraction <= 1.0:
        raise DatasetError(
            f"Need num_images >= 1, image_size >= 32 and 0 <= empty_fraction <= 1; got {num_images}, "
            f"{image_size}, {empty_fraction}."
        )
    out = Path(out)
    params = {
        "num_images": num_images,
        "image_size": image_size,
        "seed": seed,
        "category_ids": ids,
        "empty_fraction": empty_fraction,
    }
    if already_written(out, params, _MARKER, what="Shapes"):
        return out
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    empty = set(rng.permutation(num_images)[: round(empty_fraction * num_images)].tolist())
    coco_images, coco_annotations = [], []
    for index in range(num_images):
        width, height = image_size, image_size if index % 2 == 0 else 3 * image_size // 4
        count = 0 if index in empty else int(rng.integers(1, _MAX_SHAPES + 1))
        image, shapes = _draw_image(rng, width, height, count)
        name = f"{index:05d}.png"
        image.save(out / "images" / name)
        coco_images.append({"id": index + 1, "file_name": name, "width": width, "height": height})
        lines = []
        for label, (x0, y0, x1, y1) in shapes:
            box = [x0, y0, x1 - x0, y1 - y0]
            coco_annotations.append(
                {
                    "id": len(coco_annotations) + 1,
                    "image_id": index + 1,
                    "category_id": ids[label],
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
            cx, cy = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
            lines.append(f"{label} {cx:.6f} {cy:.6f} {(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}\n")
        (out / "labels" / f"{index:05d}.txt").write_text("".join(lines), encoding="utf-8")
    categories = [{"id": i, "name": n, "supercategory": "shape"} for i, n in zip(ids, SHAPE_CLASSES, strict=True)]
    coco = {"images": coco_images, "annotations": coco_annotations, "categories": categories}
    _write_text(out / "annotations.json", json.dumps(coco))
    order = rng.permutation(num_images)
    num_val = max(1, round(_VAL_SHARE * num_images)) if num_images > 1 else 0
    for split, chosen in (("val", order[:num_val]), ("train", order[num_val:])):
        _write_text(out / f"{split}.txt", "".join(f"./images/{i:05d}.png\n" for i in sorted(chosen.tolist())))
    names = "".join(f"  {i}: {n}\n" for i, n in enumerate(SHAPE_CLASSES))
    _write_text(out / "data.yaml", f"path: .\ntrain: train.txt\nval: val.txt\nnames:\n{names}")
    _write_text(out / "classes.txt", "".join(f"{n}\n" for n in SHAPE_CLASSES))
    _write_text(out / _MARKER, json.dumps(params, sort_keys=True))
    return out


def _draw_image(
    rng: np.random.Generator, width: int, height: int, count: int
) -> tuple[Image.Image, list[tuple[int, tuple[int, int, int, int]]]]:
    """Draw a background and ``count`` non-overlapping shapes; return the image and ``(label, box)`` pairs."""
    if rng.random() < 0.5:
        base = rng.integers(10, 90, 3)
        pixels = base + rng.normal(0, 10, (height, width, 3))
    else:
        start, stop = rng.integers(0, 110, 3), rng.integers(0, 110, 3)
        ramp = np.linspace(0, 1, width if rng.random() < 0.5 else height)
        ramp = ramp[None, :, None] if len(ramp) == width else ramp[:, None, None]
        pixels = np.broadcast_to(start + (stop - start) * ramp, (height, width, 3))
    canvas = Image.fromarray(np.clip(pixels, 0, 120).astype(np.uint8), "RGB")
    placed: list[tuple[int, tuple[int, int, int, int]]] = []
    for _ in range(40 * count):
        if len(placed) == count:
            break
        side = int(rng.integers(max(8, min(width, height) // 6), min(width, height) // 2))
        x0, y0 = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        if any(x0 < b[2] + 2 and b[0] < x0 + side + 2 and y0 < b[3] + 2 and b[1] < y0 + side + 2 for _, b in placed):
            continue
        label = int(rng.integers(len(SHAPE_CLASSES)))
        colour = rng.integers(0, 120, 3)
        colour[rng.integers(3)] = rng.integers(170, 256)
        mask = Image.new("L", (width, height), 0)
        corners = (x0, y0, x0 + side - 1, y0 + side - 1)
        draw = ImageDraw.Draw(mask)
        if label == 0:
            draw.ellipse(corners, fill=255)
        elif label == 1:
            draw.rectangle(corners, fill=255)
        else:
            draw.polygon([(x0 + (side - 1) / 2, y0), (x0, y0 + side - 1), (x0 + side - 1, y0 + side - 1)], fill=255)
        canvas.paste(tuple(int(c) for c in colour), mask=mask)
        ys, xs = np.nonzero(np.asarray(mask))
        placed.append((label, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)))
    return canvas, placed


def _write_text(path: Path, text: str) -> None:
    write_text_atomic(path, text)
