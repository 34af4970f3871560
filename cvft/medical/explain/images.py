"""Explain a classifier's predictions on image files: one PNG per image (input | heat-map overlay)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from cvft.callbacks.report import _pyplot, _save_figure
from cvft.data.normalization import per_channel
from cvft.data.transforms import build_transforms, data_config_for
from cvft.errors import CvftError
from cvft.medical.explain.gradcam import grad_cam, is_vit, timm_model
from cvft.medical.explain.overlay import overlay, to_rgb_uint8
from cvft.medical.explain.rollout import attention_rollout

__all__ = ["METHODS", "Preprocessing", "explain_images", "explain_tensor"]

METHODS: tuple[str, ...] = ("auto", "gradcam", "rollout")
"""``"auto"`` is attention rollout for ViTs and Grad-CAM for everything else."""

_MEDICAL_KEYS = ("window", "slice_index", "context", "frame", "sampler", "medmnist")
_READER_KEYS = ("window", "slice_index", "axis", "context", "frame")


@dataclass
class Preprocessing:
    """How a file becomes the model's input: the evaluation pipeline of the data module the model trained with.

    ``letterbox=True`` is :class:`~cvft.data.medical.MedicalImageDataModule`'s (longest side resized, padded),
    ``False`` :class:`~cvft.data.ImageFolderDataModule`'s (shorter side resized to ``size / crop_pct``, centre
    crop). Files are read with :func:`cvft.data.medical.read_medical_image` (``reader_options``) as ``[0, 1]``.

    Example:
        >>> steps = Preprocessing(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
        >>> steps.transform(np.zeros((40, 50, 1), np.float32)).shape
        torch.Size([3, 32, 32])
    """

    image_size: int | tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int = 3
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    letterbox: bool = False
    reader_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_model(cls, model: nn.Module, data_hparams: Mapping[str, Any] | None = None) -> Preprocessing:
        """The backbone's pretrained data config, overridden by the data module's hyperparameters of a checkpoint.

        Example:
            >>> from cvft.tasks import ImageClassifier
            >>> model = ImageClassifier("test_resnet", pretrained=False, num_classes=2)
            >>> Preprocessing.for_model(model, {"image_size": 48, "window": "lung"}).reader_options
            {'window': 'lung'}
        """
        data = dict(data_hparams or {})
        config = data_config_for(timm_model(model))
        hparams = getattr(model, "hparams", None) or {}
        channels = int(hparams.get("in_chans") or config["input_size"][0])
        height, width = config["input_size"][1:]
        size = data.get("image_size") or (height if height == width else (height, width))
        return cls(
            image_size=size if isinstance(size, int) else tuple(size),
            mean=per_channel(data.get("mean") or config["mean"], channels, "mean"),
            std=per_channel(data.get("std") or config["std"], channels, "std"),
            channels=channels,
            interpolation=config["interpolation"],
            crop_pct=config["crop_pct"],
            letterbox=any(key in data for key in _MEDICAL_KEYS),
            reader_options={k: data[k] for k in _READER_KEYS if data.get(k) not in (None, 0)},
        )

    def read(self, path: str | Path) -> np.ndarray:
        """Read a file as ``float32`` ``H x W x channels`` in ``[0, 1]`` (DICOM, NIfTI, PNG, JPEG, TIFF ...)."""
        from cvft.data.medical import fit_channels, read_medical_image

        return fit_channels(read_medical_image(path, **self.reader_options), self.channels, path)

    def transform(self, image: np.ndarray) -> Tensor:
        """Normalised ``C x H x W`` tensor of a ``[0, 1]`` image, as in evaluation."""
        if image.ndim == 2:
            image = image[:, :, None]
        if image.shape[2] != self.channels:
            from cvft.data.medical import fit_channels

            image = fit_channels(image, self.channels)
        image = np.ascontiguousarray(image, dtype=np.float32)
        if self.letterbox:
            from cvft.data.medical import build_medical_transforms

            pipeline = build_medical_transforms(
                self.image_size, self.mean, self.std, train=False, interpolation=self.interpolation
            )
            return pipeline(image=image)["image"]
        pipeline = build_transforms(
            self.image_size, self.mean, self.std, train=False, interpolation=self.interpolation, crop_pct=self.crop_pct
        )
        return pipeline(image=image * 255.0)["image"]  # the image-folder pipeline normalises 0..255 values

    def display(self, tensor: Tensor) -> np.ndarray:
        """Undo the normalisation: the model's input as ``H x W x 3`` ``uint8`` for display."""
        mean = torch.tensor(self.mean).reshape(-1, 1, 1)
        std = torch.tensor(self.std).reshape(-1, 1, 1)
        return to_rgb_uint8((tensor.detach().cpu().float() * std + mean).clamp(0, 1))


def explain_tensor(
    model: nn.Module,
    images: Tensor,
    method: Literal["auto", "gradcam", "rollout"] = "auto",
    target_class: int | None = None,
) -> tuple[Tensor, str]:
    """Heat maps ``(B, H, W)`` in ``[0, 1]`` for a normalised batch, and the method used.

    Example:
        >>> import timm
        >>> maps, used = explain_tensor(timm.create_model("test_vit", pretrained=False), torch.randn(1, 3, 32, 32))
        >>> maps.shape, used
        (torch.Size([1, 32, 32]), 'rollout')
    """
    if method not in METHODS:
        raise CvftError(f"Unknown explanation method {method!r}; choose one of {', '.join(METHODS)}.")
    if method == "auto":
        method = "rollout" if is_vit(model) else "gradcam"
    if method == "rollout":
        if not is_vit(model):
            raise CvftError("Attention rollout needs a vision transformer; use method='gradcam' for CNNs.")
        return attention_rollout(model, images), method
    return grad_cam(model, images, target_class=target_class), method


def explain_images(
    model: nn.Module,
    paths: Sequence[str | Path],
    method: Literal["auto", "gradcam", "rollout"] = "auto",
    out_dir: str | Path = "explanations",
    class_names: Sequence[str] | None = None,
    preprocessing: Preprocessing | None = None,
    target_class: int | None = None,
    alpha: float = 0.45,
) -> list[Path]:
    """Write ``<out_dir>/<file stem>.png`` per image: the model's input and the heat map, titled with the prediction.

    Args:
        model: An :class:`~cvft.tasks.ImageClassifier` (``ImageClassifier.from_checkpoint(...)``) or a timm model.
        paths: Image files (anything :func:`cvft.data.medical.read_medical_image` reads).
        method: ``"auto"`` (rollout for ViTs, Grad-CAM otherwise), ``"gradcam"`` or ``"rollout"``.
        out_dir: Output folder.
        class_names: Class names for titles (default: the model's).
        preprocessing: Input pipeline (default: :meth:`Preprocessing.for_model`).
        target_class: Class Grad-CAM explains (default: the predicted one); rollout is class-agnostic.
        alpha: Heat-map weight in the overlay.

    Returns:
        The written PNG paths, in the order of ``paths``.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> from cvft.tasks import ImageClassifier
        >>> folder = Path(tempfile.mkdtemp())
        >>> Image.new("L", (40, 40), 90).save(folder / "scan.png")
        >>> model = ImageClassifier("test_resnet", pretrained=False, class_names=["normal", "nodule"])
        >>> [p.name for p in explain_images(model, [folder / "scan.png"], out_dir=folder / "out")]
        ['scan.png']
    """
    steps = preprocessing or Preprocessing.for_model(model)
    names = list(class_names or getattr(model, "class_names", None) or [])
    multi_label = bool(getattr(model, "multi_label", False))
    device = next(model.parameters()).device
    out_dir = Path(out_dir)
    written: list[Path] = []
    used_names: set[str] = set()
    for path in paths:
        tensor = steps.transform(steps.read(path))
        batch = tensor[None].to(device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            logits = model(batch).float()
        model.train(was_training)
        probs = (logits.sigmoid() if multi_label else logits.softmax(-1))[0].cpu()
        predicted = int(probs.argmax())
        maps, used = explain_tensor(model, batch, method, target_class)
        shown = predicted if target_class is None or used == "rollout" else int(target_class)
        label = names[shown] if shown < len(names) else str(shown)
        title = f"{Path(path).name}: {label} (p={float(probs[shown]):.2f}) | {used}"
        written.append(
            _write_panel(steps.display(tensor), maps[0].cpu(), title, out_dir / _output_name(path, used_names), alpha)
        )
    return written


def _output_name(path: str | Path, used: set[str]) -> str:
    name = Path(path).name
    stem = re.sub(r"(\.nii\.gz|\.[A-Za-z0-9]+)$", "", name) or name
    candidate, index = f"{stem}.png", 1
    while candidate in used:
        candidate, index = f"{stem}_{index}.png", index + 1
    used.add(candidate)
    return candidate


def _write_panel(image: np.ndarray, heatmap: Tensor, title: str, path: Path, alpha: float) -> Path:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 4.4))
    left.imshow(image)
    left.set_title("input")
    right.imshow(overlay(image, heatmap, alpha))
    right.set_title("explanation")
    for ax in (left, right):
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save_figure(plt, fig, path)
