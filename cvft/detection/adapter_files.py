"""Detector adapter files: the trained tensors of a whole detector (backbone strategy tensors, neck, heads).

The file is a cvft adapter (:mod:`cvft.adapter_files`: safetensors, format ``cvft-adapter/1``, backbone, strategies,
class names) whose tensor names are the detector's own (``backbone.*``, ``neck.*``, ``detector.*``). Its metadata
also records the detector's architecture (head, classes, pyramid, anchors, image size), so
:meth:`~cvft.tasks.ObjectDetector.from_adapter` rebuilds the same network on a fresh copy of the pretrained
backbone. The frozen pretrained weights stay out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from cvft.adapter_files import (
    ADAPTER_FORMAT,
    adapter_file_path,
    adapter_metadata,
    adapter_state_dict,
    load_adapter,
)
from cvft.backbones.weights import read_safetensors, write_safetensors_atomic
from cvft.errors import CheckpointMismatchError, WeightsError

__all__ = ["save_detector_adapter", "load_detector_adapter", "read_detector_metadata"]

_DETECTOR_KEY = "detector"


def save_detector_adapter(model: nn.Module, path: str | Path, architecture: Mapping[str, Any]) -> Path:
    """Write ``model``'s trainable tensors (and updating BatchNorm statistics) with its architecture to ``path``.

    Args:
        model: An :class:`~cvft.tasks.ObjectDetector` (any module whose hparams hold ``backbone`` and ``strategies``).
        path: Output file; ``.safetensors`` is appended when missing.
        architecture: The constructor arguments that shape the network (``head``, ``num_classes`` ...).

    Returns:
        The path written.

    Example:
        >>> import tempfile
        >>> from cvft.tasks import ObjectDetector
        >>> detector = ObjectDetector(2, backbone="test_resnet", pretrained=False, image_size=64, fpn_channels=32,
        ...                           strategies=["linear_probe"])
        >>> path = detector.save_adapter(tempfile.mkdtemp() + "/shapes")  # calls save_detector_adapter
        >>> architecture, strategies = read_detector_metadata(path)
        >>> architecture["head"], [s["name"] for s in strategies], path.name
        ('fcos', ['linear_probe'], 'shapes.safetensors')
        >>> load_detector_adapter(detector, path, "test_resnet")["num_classes"]
        2
    """
    tensors = adapter_state_dict(model)
    if not tensors:
        raise WeightsError("The detector has no trainable tensors to save.")
    class_names = list(architecture.get("class_names") or [])
    metadata = {
        **adapter_metadata(str(architecture["backbone"]), model.hparams["strategies"], class_names),
        _DETECTOR_KEY: json.dumps(dict(architecture)),
    }
    return write_safetensors_atomic(tensors, adapter_file_path(path), metadata, hint="Choose a writable output folder.")


def read_detector_metadata(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The architecture arguments and strategy configurations stored in a detector adapter file.

    See :func:`save_detector_adapter` for an example.

    Raises:
        WeightsError: The file is missing or not a cvft adapter.
        CheckpointMismatchError: It is a classifier adapter (no detector architecture).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Adapter file {path} does not exist; pass the .safetensors written by save_adapter.")
    _, metadata = read_safetensors(path)
    if metadata.get("format") != ADAPTER_FORMAT:
        raise WeightsError(f"{path} is not a cvft adapter file (metadata format={metadata.get('format')!r}).")
    if _DETECTOR_KEY not in metadata:
        raise CheckpointMismatchError(
            f"{path} is a classifier adapter, not a detector adapter (no detector architecture in its metadata); "
            "build the detector yourself with the same backbone and strategies, or use ImageClassifier.from_adapter."
        )
    return json.loads(metadata[_DETECTOR_KEY]), json.loads(metadata.get("strategies", "[]"))


def load_detector_adapter(model: nn.Module, path: str | Path, backbone: str) -> dict[str, Any]:
    """Copy a detector adapter's tensors into ``model``; return the architecture stored with it.

    See :func:`save_detector_adapter` for an example.

    Raises:
        CheckpointMismatchError: Another backbone, or tensors that do not fit (other head, classes or strategies).
    """
    architecture, _ = read_detector_metadata(path)
    load_adapter(model, path, backbone=backbone)
    return architecture
