"""Adapter files: only the tensors a fine-tuning run trained, in ``.safetensors``, with what is needed to reuse them.

("Adapter" here is the file, as in PEFT's adapter checkpoints; the bottleneck adapter *modules* are
:mod:`cvft.strategies.adapters`.)

An adapter file holds the trainable parameters (LoRA matrices, biases, the head ...) plus the running statistics
of BatchNorm layers that were allowed to update and the buffers modules list in ``adapter_buffer_names`` (state
chosen from data, such as the indices sparse tuning selected, and the running statistics of every BatchNorm layer
under a ``bn: train`` or ``bn: adabn`` policy, whose affine weights may be frozen); the frozen pretrained weights
stay out. Its metadata
records the backbone name, the strategy configuration, the class names and the cvft version, so the file can be put
back on a fresh copy of the same pretrained backbone, and refuses to go onto another one; a classifier calibrated by
temperature scaling also records its ``temperature`` (absent: 1).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cvft import __version__
from cvft.backbones.weights import read_safetensors, write_safetensors_atomic
from cvft.errors import CheckpointMismatchError, StrategyError, WeightsError
from cvft.strategies._freeze import has_frozen_stats, is_batchnorm
from cvft.strategies.base import ADAPTER_BUFFERS_ATTR, ADAPTER_FIT_ATTR

__all__ = [
    "ADAPTER_FORMAT",
    "ADAPTER_BUFFERS_ATTR",
    "AdapterInfo",
    "AdapterSet",
    "adapter_file_path",
    "adapter_metadata",
    "adapter_state_dict",
    "save_adapter",
    "read_adapter",
    "load_adapter",
]

ADAPTER_FORMAT = "cvft-adapter/1"


class AdapterInfo(dict):
    """Metadata of an adapter file: ``backbone``, ``strategies``, ``class_names``, ``cvft_version``, ``format``,
    and ``temperature`` when the classifier was calibrated.
    """  # noqa: D205

    @property
    def backbone(self) -> str:
        """Timm name of the backbone the adapter was trained on."""
        return self["backbone"]

    @property
    def strategies(self) -> list[dict[str, Any]]:
        """Strategy configurations, ``[{"name": ..., **kwargs}]``."""
        return self["strategies"]

    @property
    def class_names(self) -> list[str] | None:
        """Class names of the head, when known."""
        return self.get("class_names")

    @property
    def temperature(self) -> float:
        """Temperature scaling's ``T`` of the classifier (1.0 when the file records none)."""
        return float(self.get("temperature", 1.0))


def _architecture(name: str) -> str:
    return name.split(".", 1)[0]


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The tensors an adapter file stores: trainable parameters and the statistics of updating BatchNorm layers.

    Example:
        >>> import timm
        >>> from cvft.strategies import apply_strategies
        >>> model = timm.create_model("test_resnet", num_classes=3)
        >>> _ = apply_strategies(model, ["linear_probe"])
        >>> sorted(adapter_state_dict(model))
        ['fc.bias', 'fc.weight']
    """
    tensors = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        # state a strategy chose from data and must travel with the weights (e.g. sparse tuning's selected indices)
        for buffer_name in getattr(module, ADAPTER_BUFFERS_ATTR, ()):
            tensors[prefix + buffer_name] = getattr(module, buffer_name).detach()
        if is_batchnorm(module) and not has_frozen_stats(module):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                continue  # fully frozen layer: its statistics do not move either
            for buffer_name, buffer in module.named_buffers(recurse=False):
                if buffer is not None:
                    tensors[prefix + buffer_name] = buffer.detach()
    return tensors


def adapter_file_path(path: str | Path) -> Path:
    """``path`` as an adapter file name: ``.safetensors`` is appended when missing.

    Example:
        >>> adapter_file_path("runs/cats").name, adapter_file_path("cats.safetensors").name
        ('cats.safetensors', 'cats.safetensors')
    """
    path = Path(path)
    return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")


def adapter_metadata(
    backbone: str,
    strategies: Sequence[Mapping[str, Any]],
    class_names: Sequence[str] | None,
    temperature: float | None = None,
) -> dict[str, str]:
    """The metadata every adapter file carries: format, backbone, strategies, class names and cvft version.

    A ``temperature`` other than ``None`` and 1 (temperature scaling) is recorded too, exactly (``repr``).

    Example:
        >>> adapter_metadata("test_resnet", [{"name": "lora", "rank": 2}], None)["strategies"]
        '[{"name": "lora", "rank": 2}]'
        >>> adapter_metadata("test_resnet", [], None, temperature=1.5)["temperature"]
        '1.5'
    """
    metadata = {
        "format": ADAPTER_FORMAT,
        "backbone": backbone,
        "strategies": json.dumps(list(strategies)),
        "class_names": json.dumps(list(class_names) if class_names is not None else None),
        "cvft_version": __version__,
    }
    if temperature is not None and temperature != 1.0:
        metadata["temperature"] = repr(float(temperature))
    return metadata


def save_adapter(
    model: nn.Module,
    path: str | Path,
    backbone: str,
    strategies: Sequence[Mapping[str, Any]],
    class_names: Sequence[str] | None = None,
    temperature: float | None = None,
) -> Path:
    """Write ``model``'s trained tensors and metadata to ``path`` (``.safetensors``), atomically.

    Args:
        model: The backbone after training (strategies applied).
        path: Output file; ``.safetensors`` is appended when missing.
        backbone: timm name of the backbone (``vit_small_patch16_224.augreg_in21k``).
        strategies: Strategy configurations, e.g. ``StrategyStack.config()``.
        class_names: Class names of the head.
        temperature: Temperature scaling's ``T`` of the classifier (``None`` or 1: not recorded).

    Returns:
        The path written.
    """
    tensors = adapter_state_dict(model)
    if not tensors:
        raise WeightsError("The model has no trainable tensors to save; apply a strategy and train it first.")
    metadata = adapter_metadata(backbone, strategies, class_names, temperature)
    return write_safetensors_atomic(tensors, adapter_file_path(path), metadata, hint="Choose a writable output folder.")


def read_adapter(path: str | Path) -> tuple[dict[str, Tensor], AdapterInfo]:
    """Read an adapter file (safetensors only: nothing is unpickled).

    Raises:
        WeightsError: The file is missing, unreadable, or not a cvft adapter.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Adapter file {path} does not exist; pass the .safetensors written by save_adapter.")
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != ADAPTER_FORMAT:
        raise WeightsError(
            f"{path} is not a cvft adapter file (metadata format={metadata.get('format')!r}); "
            "for full weights use create_backbone(weights=...)."
        )
    try:
        info = AdapterInfo(
            format=metadata["format"],
            backbone=metadata["backbone"],
            strategies=json.loads(metadata.get("strategies", "[]")),
            class_names=json.loads(metadata.get("class_names", "null")),
            cvft_version=metadata.get("cvft_version", "unknown"),
        )
        if "temperature" in metadata:
            info["temperature"] = _temperature(metadata["temperature"])
    except (KeyError, ValueError) as error:
        raise WeightsError(
            f"Adapter file {path} has damaged metadata ({type(error).__name__}: {error}); write it again with "
            "save_adapter (or `cvft fit`)."
        ) from None
    return tensors, info


def _temperature(text: str) -> float:
    """A recorded temperature: a finite number > 0 (``ValueError`` otherwise)."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature {text!r} is not a finite number > 0")
    return value


def _fit_shapes(model: nn.Module, tensors: Mapping[str, Tensor], path: str | Path) -> None:
    """Let modules that define ``fit_adapter_tensors`` resize to ``tensors`` (a selection of another size)."""
    for module_name, module in model.named_modules():
        fit = getattr(module, ADAPTER_FIT_ATTR, None)
        if not callable(fit):
            continue
        prefix = f"{module_name}." if module_name else ""
        try:
            fit({key[len(prefix) :]: tensor for key, tensor in tensors.items() if key.startswith(prefix)})
        except StrategyError as error:
            raise CheckpointMismatchError(f"Adapter {path} does not fit this model: {error}") from None


def load_adapter(model: nn.Module, path: str | Path, backbone: str | None = None) -> AdapterInfo:
    """Copy an adapter's tensors into ``model`` (already built with the same strategies) and return its metadata.

    Args:
        model: A fresh backbone with the adapter's strategies set up (e.g. LoRA layers injected).
        path: The adapter file.
        backbone: Name of ``model``'s backbone; checked against the adapter's. Defaults to timm's
            ``pretrained_cfg["architecture"]`` when the model has one.

    Raises:
        CheckpointMismatchError: The adapter was trained on another backbone, or its tensors do not fit the model;
            the message says which backbone it expects.
    """
    tensors, info = read_adapter(path)
    if backbone is None:
        backbone = getattr(model, "pretrained_cfg", {}).get("architecture")
    if backbone is not None and _architecture(backbone) != _architecture(info.backbone):
        raise CheckpointMismatchError(
            f"Adapter {path} was trained on backbone {info.backbone!r}, not {backbone!r}. Create the model with "
            f"backbone={info.backbone!r} (and the same pretrained weights) before loading it."
        )
    _fit_shapes(model, tensors, path)
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    missing = sorted(k for k in tensors if k not in state)
    wrong = sorted(k for k in tensors if k in state and state[k].shape != tensors[k].shape)
    if missing or wrong:
        detail = "; ".join(
            part
            for part in (
                f"not in the model: {', '.join(missing[:5])}" if missing else "",
                f"shape differs: {', '.join(wrong[:5])}" if wrong else "",
            )
            if part
        )
        raise CheckpointMismatchError(
            f"Adapter {path} does not fit this model ({detail}). It expects backbone {info.backbone!r} with "
            f"strategies {[s.get('name') for s in info.strategies]} and {len(info.class_names or [])} classes."
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            state[name].copy_(tensor)
    return info


class AdapterSet:
    """Several adapters for one backbone, switched by name.

    All adapters must come from the same backbone and strategy layout (same LoRA targets and ranks, same head
    size). Their tensors stay in memory; :meth:`use` copies one set into the model, so switching costs one copy of
    the adapter tensors and never touches the frozen base weights.

    Args:
        model: The backbone with the adapters' strategies set up.
        backbone: Its timm name, checked against each adapter's.

    Example:
        >>> import tempfile, timm, torch
        >>> from cvft.strategies import apply_strategies
        >>> model = timm.create_model("test_resnet", num_classes=2)
        >>> _ = apply_strategies(model, ["linear_probe"])
        >>> folder = tempfile.mkdtemp()
        >>> for i, name in enumerate(["cats", "cars"]):
        ...     _ = torch.nn.init.constant_(model.fc.bias, float(i))
        ...     _ = save_adapter(model, f"{folder}/{name}", "test_resnet", [{"name": "linear_probe"}], ["a", "b"])
        >>> adapters = AdapterSet(model, "test_resnet")
        >>> _ = adapters.add("cats", f"{folder}/cats.safetensors")
        >>> _ = adapters.add("cars", f"{folder}/cars.safetensors")
        >>> adapters.use("cats")
        >>> model.fc.bias.tolist(), adapters.active
        ([0.0, 0.0], 'cats')
        >>> adapters.use("cars")
        >>> model.fc.bias.tolist()
        [1.0, 1.0]
    """

    def __init__(self, model: nn.Module, backbone: str | None = None) -> None:
        self.model = model
        self.backbone = backbone
        self.active: str | None = None
        self._adapters: dict[str, tuple[dict[str, Tensor], AdapterInfo]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._adapters

    @property
    def names(self) -> list[str]:
        """Names of the loaded adapters."""
        return list(self._adapters)

    def info(self, name: str) -> AdapterInfo:
        """Metadata of adapter ``name`` (class names, strategies ...)."""
        return self._adapters[name][1]

    def add(self, name: str, path: str | Path) -> AdapterInfo:
        """Read an adapter file, check that it fits the model, and keep it under ``name``."""
        if name in self._adapters:
            raise WeightsError(f"An adapter named {name!r} is already loaded; pick another name.")
        previous = {k: v.detach().clone() for k, v in adapter_state_dict(self.model).items()}
        info = load_adapter(self.model, path, self.backbone)  # validates backbone, names and shapes
        tensors, _ = read_adapter(path)
        self._adapters[name] = (tensors, info)
        self._copy_in(previous)  # adding does not switch
        return info

    def use(self, name: str) -> None:
        """Make adapter ``name`` the active one."""
        if name not in self._adapters:
            raise WeightsError(f"No adapter named {name!r}; loaded adapters: {', '.join(self.names) or 'none'}.")
        self._copy_in(self._adapters[name][0])
        self.active = name

    def _copy_in(self, tensors: Mapping[str, Tensor]) -> None:
        _fit_shapes(self.model, tensors, "in memory")
        state = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        with torch.no_grad():
            for key, tensor in tensors.items():
                state[key].copy_(tensor)
