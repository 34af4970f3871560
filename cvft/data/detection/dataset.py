"""``DetectionDataset``: detection records in, ``(image, target)`` tensors out; ``detection_collate`` batches them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cvft.data.detection.annotations import DetectionRecord
from cvft.data.io import load_image
from cvft.errors import DatasetError

__all__ = ["DetectionDataset", "detection_collate"]


class DetectionDataset(Dataset):
    """Images with boxes, transformed together.

    Items are ``(image, target)``: ``image`` a ``float32`` ``(3, H, W)`` tensor in 0..1 (not normalised: the
    detector normalises), ``target`` a dict with ``boxes`` (``float32`` ``(N, 4)`` ``xyxy`` pixels of the
    transformed image), ``labels`` (``int64`` ``(N,)``, ``0..C-1``) and ``image_id`` (``int64`` 0-dim).

    With ``predict=True`` items are ``(image, meta)`` with ``meta = {"index", "path", "orig_size": (h, w),
    "size": (h, w)}`` (``size`` after the transform), so predicted boxes can be scaled back to the original image.

    Images are decoded by :func:`~cvft.data.io.load_image` (grayscale, RGBA, 16-bit … become RGB ``uint8``).

    Args:
        records: One :class:`~cvft.data.detection.annotations.DetectionRecord` per image; for ``predict`` plain
            image paths work too.
        transform: Pipeline from :func:`~cvft.data.detection.transforms.build_detection_transforms` (called with
            ``image=``, ``bboxes=``, ``labels=``); ``None``: the image as stored.
        predict: Return ``(image, meta)`` items (boxes are not needed).

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> path = Path(tempfile.mkdtemp()) / "a.png"
        >>> Image.new("RGB", (8, 6)).save(path)
        >>> record = DetectionRecord(path, np.array([[1, 1, 4, 5]], np.float32), np.array([0]), 7, 8, 6)
        >>> image, target = DetectionDataset([record])[0]
        >>> image.shape, target["boxes"].tolist(), target["labels"].tolist(), int(target["image_id"])
        (torch.Size([3, 6, 8]), [[1.0, 1.0, 4.0, 5.0]], [0], 7)
    """

    def __init__(
        self,
        records: Sequence[DetectionRecord | str | Path],
        transform: Callable[..., dict[str, Any]] | None = None,
        predict: bool = False,
    ) -> None:
        self.records = [r if isinstance(r, DetectionRecord) else _unlabelled(Path(r), i) for i, r in enumerate(records)]
        self.transform = transform
        self.predict = predict

    @property
    def paths(self) -> list[Path]:
        """Image files in item order."""
        return [r.path for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        record = self.records[index]
        image = load_image(record.path)
        height, width = image.shape[:2]
        if not self.predict and (record.width, record.height) != (width, height):
            raise DatasetError(
                f"{record.path} decodes as {width}x{height} px but its annotations say {record.width}x"
                f"{record.height}. Fix the width / height in the annotations (or the file's EXIF orientation)."
            )
        boxes, labels = record.boxes.reshape(-1, 4).astype(np.float32), record.labels.astype(np.int64)
        if self.transform is not None:
            out = self.transform(image=image, bboxes=boxes, labels=labels)
            image = out["image"]
            boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
            labels = np.asarray(out["labels"], np.int64).reshape(-1)
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        if self.predict:
            meta = {
                "index": index,
                "path": str(record.path),
                "orig_size": (height, width),
                "size": (int(tensor.shape[1]), int(tensor.shape[2])),
            }
            return tensor, meta
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels),
            "image_id": torch.tensor(record.image_id, dtype=torch.int64),
        }
        return tensor, target


def detection_collate(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Batch detection items as lists (images may differ in size, boxes in number), as torchvision detectors take.

    Args:
        batch: ``(image, target)`` or ``(image, meta)`` items.

    Returns:
        ``(images, targets)`` (or ``(images, metas)``) as two lists.

    Example:
        >>> items = [(torch.zeros(3, 4, 4), {"labels": torch.tensor([1])}), (torch.zeros(3, 2, 2), {})]
        >>> images, targets = detection_collate(items)
        >>> len(images), images[1].shape, targets[0]["labels"].tolist()
        (2, torch.Size([3, 2, 2]), [1])
    """
    images, targets = zip(*batch, strict=True) if batch else ((), ())
    return list(images), list(targets)


def _unlabelled(path: Path, index: int) -> DetectionRecord:
    return DetectionRecord(path, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), index, 0, 0)
