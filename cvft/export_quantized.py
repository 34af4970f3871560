"""``cvft export --quantize``: a fine-tuned classifier with int8 weights, written to safetensors, with a report.

Schemes (torchao; ``pip install "cvft[qlora]"``):

* ``int8-weight-only``: int8 weights, symmetric, one scale per output channel (``Int8WeightOnlyConfig``);
* ``int8-dynamic``: the same weights, and activations quantised to int8 per token at run time
  (``Int8DynamicActivationInt8WeightConfig``).

The file holds no pickled tensor subclass: every quantised weight (each Linear and Conv2d outside the classifier head,
which stays float as in ``qat``) is stored as an ``int8`` tensor under its own key plus a ``float32`` per-channel
``<key>.int8_scale``; everything else is stored as is. :func:`load_int8_state_dict` turns it back into a plain float
state dict for ``timm.create_model(...)`` (``load_state_dict(strict=True)``), the weights being exactly
``int8 * scale``. The values are computed with torchao's ``choose_qparams_affine`` / ``quantize_affine``, the
primitives of torchao's int8 configs and of ``qat``'s fake quantisation, so a model trained with ``qat`` exports to
the weights it trained with.

The report compares the quantised model with the float one: file sizes, accuracy on given validation batches, and CPU
latency (median of timed batches) of torchao's int8 runtime (``quantize_`` on the Linear layers; convolutions run
in float with the int8-rounded weights, as torchao has no CPU int8 convolution).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from cvft.backbones.weights import write_safetensors_atomic
from cvft.errors import CvftError, DatasetError

__all__ = ["QUANTIZE_SCHEMES", "QuantizedExportReport", "int8_state_dict", "load_int8_state_dict",
           "quantized_runtime", "median_latency", "accuracy", "export_quantized"]  # fmt: skip

#: ``cvft export --quantize`` choices -> torchao config class names.
QUANTIZE_SCHEMES = {
    "int8-weight-only": "Int8WeightOnlyConfig",
    "int8-dynamic": "Int8DynamicActivationInt8WeightConfig",
}
SCALE_SUFFIX = ".int8_scale"


def _torchao():
    try:
        import torchao.quantization as quantization
        from torchao.quantization import quant_primitives
    except ImportError as err:
        raise CvftError(
            'Quantised export needs torchao, which is not installed: pip install "cvft[qlora]" '
            "(or pip install torchao)."
        ) from err
    return quantization, quant_primitives


def _check_scheme(scheme: str) -> None:
    if scheme not in QUANTIZE_SCHEMES:
        raise CvftError(f"Unknown quantisation scheme {scheme!r}; choose one of {', '.join(QUANTIZE_SCHEMES)}.")


def _quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Plain Linear / Conv2d layers outside the classifier head, by name."""
    head = {id(m) for m in model.get_classifier().modules()} if hasattr(model, "get_classifier") else set()
    return {
        name: module
        for name, module in model.named_modules()
        if type(module) in (nn.Linear, nn.Conv2d) and id(module) not in head
    }


def _int8_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(codes, scale)``: torchao's int8 symmetric quantisation, one scale per output channel."""
    _, primitives = _torchao()
    matrix = weight.detach().float().reshape(weight.shape[0], -1)
    block = (1, matrix.shape[1])
    symmetric = primitives.MappingType.SYMMETRIC
    scale, zero = primitives.choose_qparams_affine(matrix, symmetric, block, torch.int8, -128, 127)
    codes = primitives.quantize_affine(matrix, block, scale, zero, torch.int8, -128, 127)
    return codes.reshape(weight.shape), scale.float()


def int8_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s state dict with the weights of its Linear / Conv2d layers (head excepted) as int8 plus scales.

    Example:
        >>> import timm
        >>> tensors = int8_state_dict(timm.create_model("test_resnet", num_classes=3))
        >>> tensors["layer1.0.conv1.weight"].dtype, tensors["layer1.0.conv1.weight.int8_scale"].shape
        (torch.int8, torch.Size([32]))
    """
    tensors = {key: value.detach() for key, value in model.state_dict().items()}
    for name in _quantized_layers(model):
        key = f"{name}.weight"
        tensors[key], tensors[key + SCALE_SUFFIX] = _int8_per_channel(tensors[key])
    return tensors


def load_int8_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A float state dict (plain timm keys) from a file written by :func:`export_quantized`, without unpickling.

    Raises:
        CvftError: The file is missing or is not a cvft int8 export.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CvftError(f"Quantised model {path} does not exist; give the file `cvft export --quantize` wrote.")
    with safe_open(str(path), "pt") as handle:
        if (handle.metadata() or {}).get("format") != "cvft-int8":
            raise CvftError(f"{path} is not a cvft int8 export (metadata format != 'cvft-int8').")
    tensors = load_file(str(path))
    state = {}
    for key, value in tensors.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        scale = tensors.get(key + SCALE_SUFFIX)
        if scale is None:
            state[key] = value
        else:
            shape = (-1,) + (1,) * (value.dim() - 1)
            state[key] = value.float() * scale.reshape(shape)
    return state


def quantized_runtime(model: nn.Module, scheme: str) -> nn.Module:
    """A copy of ``model`` that runs int8: torchao's ``quantize_`` on its Linear layers, int8-rounded conv weights."""
    _check_scheme(scheme)
    quantization, _ = _torchao()
    runtime = copy.deepcopy(model).eval()
    layers = _quantized_layers(runtime)
    with torch.no_grad():
        for module in layers.values():
            if isinstance(module, nn.Conv2d):
                codes, scale = _int8_per_channel(module.weight)
                module.weight.copy_(codes.float() * scale.reshape(-1, 1, 1, 1))
    linear_ids = {id(m) for m in layers.values() if isinstance(m, nn.Linear)}
    config = getattr(quantization, QUANTIZE_SCHEMES[scheme])()
    quantization.quantize_(runtime, config, filter_fn=lambda module, _name: id(module) in linear_ids)
    return runtime


def median_latency(model: nn.Module, images: Tensor, repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds of one forward pass of ``images`` on the CPU, over ``repeats`` timed passes after a warm-up."""
    times = []
    with torch.inference_mode():
        for index in range(warmup + repeats):
            start = time.perf_counter()
            model(images)
            if index >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def accuracy(model: nn.Module, batches: Iterable) -> float:
    """Top-1 accuracy of ``model`` on ``(images, targets, ...)`` batches."""
    correct = total = 0
    with torch.inference_mode():
        for batch in batches:
            images, targets = batch[0], batch[1]
            correct += int((model(images).argmax(dim=1) == targets).sum())
            total += int(targets.numel())
    return correct / max(total, 1)


@dataclass
class QuantizedExportReport:
    """What :func:`export_quantized` measured (sizes in bytes, latencies in seconds, accuracies in [0, 1])."""

    path: str
    scheme: str
    file_bytes: int
    float_bytes: int
    latency_float: float
    latency_int8: float
    accuracy_float: float | None = None
    accuracy_int8: float | None = None

    def summary(self) -> str:
        """One line per measurement, for the console."""
        lines = [
            f"wrote {self.path} ({self.scheme}): {self.file_bytes / 1e6:.2f} MB, "
            f"{self.file_bytes / self.float_bytes:.0%} of float32 ({self.float_bytes / 1e6:.2f} MB)",
            f"CPU latency (median): int8 {self.latency_int8 * 1e3:.2f} ms vs float32 {self.latency_float * 1e3:.2f} "
            f"ms ({self.latency_float / self.latency_int8:.2f}x)",
        ]
        if self.accuracy_int8 is not None:
            lines.append(f"validation accuracy: int8 {self.accuracy_int8:.4f} vs float32 {self.accuracy_float:.4f}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        """The report as a plain dict."""
        return asdict(self)


def folder_batches(
    root: str | Path, backbone: nn.Module, class_names: list[str], batch_size: int = 32
) -> list[tuple[Tensor, Tensor]]:
    """``(images, labels)`` batches of a folder of class folders, labels as indices into ``class_names``.

    Images are prepared as the backbone was pretrained (timm's evaluation transform of its data config).

    Args:
        root: Folder with one sub-folder of images per class, named like the model's classes (a subset is fine).
        backbone: The timm model whose data config (size, crop, mean, std) prepares the images.
        class_names: The model's classes, in the order of its logits.
        batch_size: Images per batch.

    Raises:
        DatasetError: ``root`` is not a folder of class folders, or names a class the model does not have.
    """
    import timm.data
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"--val-root {root} is not a folder; give a folder with one sub-folder of images per class.")
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(backbone), is_training=False)
    try:
        dataset = ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as err:
        raise DatasetError(f"--val-root {root}: {err}; give a folder with one sub-folder of images per class.") from err
    unknown = [name for name in dataset.classes if name not in class_names]
    if unknown:
        raise DatasetError(
            f"--val-root {root} has class folders {unknown} that the model does not know (its classes: "
            f"{class_names}); name the folders like the model's classes."
        )
    index = torch.tensor([class_names.index(name) for name in dataset.classes])
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    return [(images, index[labels]) for images, labels in loader]


def export_quantized(
    backbone: nn.Module,
    output: str | Path,
    scheme: str,
    metadata: dict[str, str] | None = None,
    images: Tensor | None = None,
    validation: Iterable | None = None,
    repeats: int = 10,
) -> QuantizedExportReport:
    """Write ``backbone`` (a plain timm model: fold strategies first) with int8 weights and measure it.

    Args:
        backbone: The float model; it is not changed.
        output: The ``.safetensors`` file, written atomically.
        scheme: One of :data:`QUANTIZE_SCHEMES`.
        metadata: Extra safetensors metadata (backbone name, class names).
        images: The batch timed for latency (default: 8 random images at the model's input size).
        validation: ``(images, targets)`` batches to report accuracy on.
        repeats: Timed passes per model.

    Raises:
        CvftError: torchao is not installed (the message names ``pip install "cvft[qlora]"``) or the scheme is
            unknown.

    Example:
        >>> import tempfile, timm
        >>> model = timm.create_model("test_resnet", num_classes=3).eval()
        >>> report = export_quantized(model, tempfile.mkdtemp() + "/m.safetensors", "int8-weight-only", repeats=1)
        >>> report.file_bytes < report.float_bytes
        True
    """
    _check_scheme(scheme)
    _torchao()
    backbone = backbone.eval()
    tensors = int8_state_dict(backbone)
    info = {**(metadata or {}), "format": "cvft-int8", "scheme": scheme}
    path = write_safetensors_atomic(tensors, output, info, hint="Choose a writable output path.")
    runtime = quantized_runtime(backbone, scheme)
    if images is None:
        size = getattr(backbone, "pretrained_cfg", {}).get("input_size", (3, 224, 224))
        images = torch.randn(8, *size)
    report = QuantizedExportReport(
        path=str(path),
        scheme=scheme,
        file_bytes=path.stat().st_size,
        float_bytes=sum(t.numel() * t.element_size() for t in backbone.state_dict().values()),
        latency_float=median_latency(backbone, images, repeats),
        latency_int8=median_latency(runtime, images, repeats),
    )
    if validation is not None:
        batches = list(validation)
        report.accuracy_float = accuracy(backbone, batches)
        report.accuracy_int8 = accuracy(runtime, batches)
    return report
