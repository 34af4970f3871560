"""Writing object detections as ``predictions.json`` (boxes in original-image pixels), optionally drawn as PNGs."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from cvft.atomic import atomic_path, write_text_atomic
from cvft.callbacks.prediction_file import PredictionFileWriter

__all__ = ["DetectionPredictionWriter", "boxes_to_original", "box_colour", "draw_detections"]


def box_colour(label: int) -> tuple[int, int, int]:
    """The RGB colour boxes of class ``label`` are drawn in: matplotlib's ``tab10`` category colours, in turn.

    Example:
        >>> box_colour(0), box_colour(10) == box_colour(0)
        ((31, 119, 180), True)
    """
    palette = _palette()
    return palette[int(label) % len(palette)]


@functools.cache
def _palette() -> tuple[tuple[int, int, int], ...]:
    from matplotlib import colormaps

    return tuple(tuple(round(255 * channel) for channel in colour) for colour in colormaps["tab10"].colors)


def boxes_to_original(boxes: Tensor, size: Sequence[int], orig_size: Sequence[int], keep_ratio: bool = True) -> Tensor:
    """Map ``xyxy`` boxes from transformed-image pixels back to the original image, clipped to it.

    The letterbox resize (``keep_ratio=True``) scales both sides by one factor and pads at the bottom/right only, so
    going back is a pure scale by ``max(orig) / max(size)`` (``size`` may be the padded or the unpadded size: the
    longest side is the same). A plain resize (``keep_ratio=False``) scales each axis by ``orig / size``.

    Args:
        boxes: ``(N, 4)`` boxes ``x1, y1, x2, y2`` in transformed-image pixels.
        size: ``(height, width)`` of the transformed image.
        orig_size: ``(height, width)`` of the original image.
        keep_ratio: Whether the transform kept the aspect ratio (letterbox).

    Returns:
        ``(N, 4)`` float boxes in original-image pixels.

    Example:
        >>> boxes_to_original(torch.tensor([[10.0, 5.0, 50.0, 40.0]]), (64, 64), (100, 200))
        tensor([[ 31.2500,  15.6250, 156.2500, 100.0000]])
        >>> boxes_to_original(torch.tensor([[10.0, 5.0, 50.0, 40.0]]), (64, 64), (128, 32), keep_ratio=False)
        tensor([[  5.,  10.,  25.,  80.]])
    """
    boxes = boxes.detach().float().cpu().reshape(-1, 4)
    (height, width), (orig_height, orig_width) = (int(s) for s in size), (int(s) for s in orig_size)
    if keep_ratio:
        scale = max(orig_height, orig_width) / max(height, width)
        scaled = boxes * scale
    else:
        scaled = boxes * torch.tensor([orig_width / width, orig_height / height] * 2)
    limits = torch.tensor([orig_width, orig_height] * 2, dtype=scaled.dtype)
    return torch.minimum(scaled.clamp_min(0.0), limits)


class DetectionPredictionWriter(PredictionFileWriter):
    """Write ``predictions.json`` after ``trainer.predict``: one entry per image, boxes in original pixels.

    Each entry is ``{"file", "width", "height", "detections": [{"box": [x1, y1, x2, y2], "score", "label",
    "class_name", "category_id"}]}``, with the detections above ``score_threshold`` sorted by score. Boxes come
    from the detector in transformed-image pixels and are mapped back with the batch metas (``orig_size``,
    ``size``; see :func:`boxes_to_original`); ``category_id`` is the original dataset id of the class (COCO ids may
    skip numbers), taken from the module's or the data module's ``category_ids``. The file is written atomically;
    under DDP each rank writes ``predictions.rank<k>.json``. With ``draw=True`` each image is also saved with its
    boxes and labels drawn, into ``predictions/`` next to the JSON.

    Args:
        output: JSON path; by default ``predictions.json`` in the run folder.
        score_threshold: Keep detections scoring at least this.
        draw: Also write one PNG per image with the kept boxes drawn.
        line_width: Box line width of the drawings, in pixels.

    Example:
        >>> writer = DetectionPredictionWriter(score_threshold=0.5)
        >>> entry = writer.entries(
        ...     [{"boxes": [torch.tensor([[8.0, 8.0, 24.0, 24.0]])], "scores": [torch.tensor([0.9])],
        ...       "labels": [torch.tensor([1])], "metas": [{"index": 0, "path": "a.png", "orig_size": (64, 64),
        ...       "size": (32, 32)}]}], class_names=["cat", "dog"], category_ids=[3, 7])[0]
        >>> entry["detections"]
        [{'box': [16.0, 16.0, 48.0, 48.0], 'score': 0.9, 'label': 1, 'class_name': 'dog', 'category_id': 7}]
    """

    default_name = "predictions.json"

    def __init__(
        self, output: str | None = None, score_threshold: float = 0.3, draw: bool = False, line_width: int = 2
    ) -> None:
        super().__init__(output)
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}.")
        self.score_threshold = score_threshold
        self.draw = draw
        self.line_width = line_width
        self.drawings: list[Path] = []

    def entries(
        self,
        batches: Sequence[Mapping[str, Any]],
        class_names: Sequence[str] | None = None,
        category_ids: Sequence[int] | None = None,
        keep_ratio: bool = True,
    ) -> list[dict[str, Any]]:
        """Turn the outputs of ``predict_step`` into JSON-ready entries, in dataset order.

        Args:
            batches: ``{"boxes", "scores", "labels", "metas"}`` per batch (lists with one item per image).
            class_names: Name of each class index; the index as text when missing.
            category_ids: Original dataset id of each class index; the index itself when missing.
            keep_ratio: Whether the predict transform kept the aspect ratio (see :func:`boxes_to_original`).

        Returns:
            One dict per image, sorted by the meta ``index``.
        """
        entries = []
        for batch in batches:
            for boxes, scores, labels, meta in zip(
                batch["boxes"], batch["scores"], batch["labels"], batch["metas"], strict=True
            ):
                orig_height, orig_width = (int(s) for s in meta["orig_size"])
                size = meta.get("size", meta["orig_size"])
                keep = scores.detach().cpu() >= self.score_threshold
                original = boxes_to_original(boxes, size, meta["orig_size"], meta.get("keep_ratio", keep_ratio))
                kept = [
                    (box, float(score), int(label))
                    for box, score, label, chosen in zip(
                        original.tolist(),
                        scores.detach().cpu().tolist(),
                        labels.cpu().tolist(),
                        keep.tolist(),
                        strict=True,
                    )
                    if chosen
                ]
                kept.sort(key=lambda item: -item[1])
                detections = [
                    {
                        "box": [round(v, 2) for v in box],
                        "score": round(score, 5),
                        "label": label,
                        "class_name": str(class_names[label]) if class_names else str(label),
                        "category_id": int(category_ids[label]) if category_ids else label,
                    }
                    for box, score, label in kept
                ]
                entries.append(
                    {
                        "index": int(meta["index"]),
                        "file": str(meta["path"]),
                        "width": orig_width,
                        "height": orig_height,
                        "detections": detections,
                    }
                )
        entries.sort(key=lambda entry: entry["index"])
        return [{k: v for k, v in entry.items() if k != "index"} for entry in entries]

    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]) -> None:
        """Write the JSON (and the drawings) of this rank's images."""
        datamodule = getattr(trainer, "datamodule", None)
        class_names = _first_attribute("class_names", pl_module, datamodule)
        category_ids = _first_attribute("category_ids", pl_module, datamodule)
        keep_ratio = bool(
            _first_attribute("keep_ratio", datamodule, getattr(datamodule, "hparams", None), default=True)
        )
        entries = self.entries(batches, class_names, category_ids, keep_ratio)
        path = self.output_path(trainer)
        lines = ",\n".join(json.dumps(entry) for entry in entries)  # a line per image
        write_text_atomic(path, "[\n" + lines + "\n]\n")
        self.path = path
        if self.draw:
            self.drawings, used = [], set()
            for number, entry in enumerate(entries):
                stem = Path(entry["file"]).stem
                name = f"{stem}.png" if stem not in used else f"{stem}_{number}.png"  # two folders, one file name
                used.add(stem)
                self.drawings.append(draw_detections(entry, path.parent / "predictions", self.line_width, name))


def draw_detections(entry: Mapping[str, Any], folder: str | Path, line_width: int = 2, name: str | None = None) -> Path:
    """Save the image of one ``predictions.json`` entry with its boxes and labels drawn, as a PNG in ``folder``.

    Args:
        entry: ``{"file", "detections": [{"box", "score", "label", "class_name"}, ...]}``.
        folder: Output folder (created when missing).
        line_width: Box line width in pixels.
        name: File name; ``<image stem>.png`` by default.

    Returns:
        The PNG path (an existing file of that name is replaced).

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> folder = Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (40, 30)).save(folder / "a.jpg")
        >>> detection = {"box": [5, 5, 20, 20], "score": 0.8, "label": 0, "class_name": "cat"}
        >>> draw_detections({"file": str(folder / "a.jpg"), "detections": [detection]}, folder / "drawn").name
        'a.png'
    """
    from PIL import Image
    from torchvision.utils import draw_bounding_boxes

    from cvft.data.io import load_image

    image = torch.from_numpy(load_image(entry["file"])).permute(2, 0, 1).contiguous()
    detections = list(entry["detections"])
    if detections:
        image = draw_bounding_boxes(
            image,
            torch.tensor([d["box"] for d in detections], dtype=torch.float32),
            labels=[f"{d['class_name']} {d['score']:.2f}" for d in detections],
            colors=[box_colour(d["label"]) for d in detections],
            width=line_width,
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or f"{Path(entry['file']).stem}.png")
    with atomic_path(path) as partial:
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(partial, format="PNG")
    return path


def _first_attribute(name: str, *holders: Any, default: Any = None) -> Any:
    """The first non-empty ``name`` found as an attribute or mapping key of ``holders``."""
    for holder in holders:
        if holder is None:
            continue
        value = holder.get(name) if isinstance(holder, Mapping) else getattr(holder, name, None)
        if value is not None and not (isinstance(value, Sequence) and not isinstance(value, str) and not value):
            return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
    return default
