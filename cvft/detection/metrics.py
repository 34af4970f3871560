"""COCO-style detection metrics: choosing the evaluation backend and flattening mAP results into logged scalars."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence

from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision

from cvft.errors import CvftError

__all__ = ["MAP_BACKENDS", "resolve_map_backend", "detection_map", "map_scalars"]

MAP_BACKENDS: tuple[str, ...] = ("faster_coco_eval", "pycocotools")
_PER_CLASS = ("classes", "map_per_class", "mar_100_per_class")


def resolve_map_backend(backend: str = "auto") -> str:
    """The COCO evaluation backend of the mAP metric: ``faster_coco_eval`` when installed, else ``pycocotools``.

    Args:
        backend: ``"auto"``, ``"faster_coco_eval"`` or ``"pycocotools"``.

    Raises:
        CvftError: An unknown name, or the named backend (for ``"auto"``: either) is not installed.

    Example:
        >>> resolve_map_backend() in MAP_BACKENDS
        True
    """
    if backend != "auto" and backend not in MAP_BACKENDS:
        raise CvftError(f"map_backend={backend!r} is unknown; choose 'auto' or one of {list(MAP_BACKENDS)}.")
    wanted = MAP_BACKENDS if backend == "auto" else (backend,)
    for name in wanted:
        if importlib.util.find_spec(name) is not None:
            return name
    raise CvftError(
        f"Detection mAP needs {' or '.join(wanted)}, which is not installed; install it with "
        '`pip install "cvft[detection]"`.'
    )


def detection_map(backend: str = "auto") -> MeanAveragePrecision:
    """Torchmetrics' box mAP (``xyxy`` boxes, per-class results) on the resolved backend.

    Example:
        >>> detection_map().class_metrics
        True
    """
    return MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", class_metrics=True, backend=resolve_map_backend(backend)
    )


def map_scalars(result: Mapping[str, Tensor], class_names: Sequence[str], prefix: str) -> dict[str, float]:
    """Flatten a ``MeanAveragePrecision.compute()`` result into ``{prefix}/map``, ... and ``{prefix}/ap/<class>``.

    Classes without ground truth in the evaluated images (AP reported as -1) are left out.

    Example:
        >>> import torch
        >>> metric = detection_map()
        >>> box = torch.tensor([[0.0, 0, 10, 10]])
        >>> metric.update([{"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}],
        ...               [{"boxes": box, "labels": torch.tensor([1])}])
        >>> scalars = map_scalars(metric.compute(), ["cat", "dog"], "val")
        >>> scalars["val/map_50"], scalars["val/ap/dog"], "val/ap/cat" in scalars
        (1.0, 1.0, False)
    """
    scalars = {
        f"{prefix}/{key}": float(value)
        for key, value in result.items()
        if key not in _PER_CLASS and isinstance(value, Tensor) and value.numel() == 1
    }
    classes = result["classes"].reshape(-1).tolist()
    for index, ap in zip(classes, result["map_per_class"].reshape(-1).tolist(), strict=False):
        if 0 <= index < len(class_names) and ap >= 0:
            scalars[f"{prefix}/ap/{class_names[index]}"] = float(ap)
    return scalars
