"""Cached backbone features: train a classifier head on a frozen backbone without decoding images every epoch.

With ``linear_probe`` or ``classifier_only`` and deterministic preprocessing, the backbone maps a given image to the
same pooled pre-logit features (timm's ``forward_head(forward_features(x), pre_logits=True)``) at every epoch. This
module checks that this holds (:func:`check_cacheable`), computes those features once per split (with a progress
bar), keeps them in memory or in a safetensors file under ``$CVFT_CACHE/features`` (:class:`FeatureStore`), and puts
a :class:`FeatureDataset` in place of the DataModule's image dataset for the fit (:func:`activate_feature_cache`).
The DataModule still builds the DataLoaders, so batch size, sampler and shuffling are exactly those of the image
run, and the head trains in place (``backbone.get_classifier()``): checkpoints, adapters, predict and export do
not change.

A cache entry's key covers the backbone name and options, a hash of every frozen tensor, the transform and the
DataModule's data options, every file with its size and modification time (or the array's bytes), the targets,
the split, the precision and device type, and the torch / timm versions: a change to any of them computes new
features.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import Dataset

from cvft.atomic import atomic_path
from cvft.errors import ConfigError

__all__ = [
    "FEATURE_CACHE_MODES",
    "CacheDecision",
    "FeatureDataset",
    "FeatureStore",
    "ActiveFeatureCache",
    "check_cacheable",
    "activate_feature_cache",
    "head_logits",
]

_logger = logging.getLogger(__name__)

FEATURE_CACHE_MODES: tuple[str, ...] = ("auto", "memory", "disk", "off")
"""Values of ``ImageClassifier(feature_cache=...)``."""

_FORMAT = "cvft-features-v1"
_MEMORY_ENTRIES = 8
_CACHED_SPLITS = ("train", "val")
_DATA_OPTIONS_IGNORED = {"batch_size", "num_workers", "predict_root", "check_images", "on_bad_image"}


@dataclass(frozen=True)
class CacheDecision:
    """Whether features are cached for this fit, and why (or why not).

    Attributes:
        use: Cache the features.
        reason: One sentence for the log line.
        head_dropout: Dropout rate the model applies to the pre-logit features in training mode (timm's
            ``drop_rate``); the cached training step applies it to the cached features with the same random draws.
    """

    use: bool
    reason: str
    head_dropout: float = 0.0


class FeatureDataset(Dataset):
    """Cached features and targets; items are ``{"features": Tensor, "target": Tensor}``.

    The dict tells :class:`~cvft.tasks.ImageClassifier`'s steps that a batch holds features, not images. Attributes
    that DataModules set on image datasets (``num_views``, ``return_index``) are accepted and ignored.

    Example:
        >>> data = FeatureDataset(torch.zeros(4, 8), torch.arange(4))
        >>> len(data), data[1]["features"].shape, data[1]["target"]
        (4, torch.Size([8]), tensor(1))
    """

    def __init__(self, features: Tensor, targets: Tensor) -> None:
        if len(features) != len(targets):
            raise ValueError(f"{len(features)} feature rows but {len(targets)} targets.")
        self.features, self.targets = features, targets
        self.num_views, self.return_index = 1, False

    @classmethod
    def placeholder(cls, length: int) -> FeatureDataset:
        """An empty dataset of ``length`` items, for DataLoaders built before the features exist; see :meth:`fill`."""
        return cls(torch.empty(length, 0), torch.empty(length))

    def fill(self, features: Tensor, targets: Tensor) -> None:
        """Put the features in (same number of rows), before any DataLoader over this dataset is iterated."""
        if len(features) != len(self) or len(targets) != len(self):
            raise ValueError(f"Expected {len(self)} feature rows and targets, got {len(features)} and {len(targets)}.")
        self.features, self.targets = features, targets

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"features": self.features[index], "target": self.targets[index]}


def head_logits(backbone: nn.Module, features: Tensor, head_dropout: float = 0.0) -> Tensor:
    """Logits from pooled pre-logit features: the head's dropout (training only) and ``get_classifier()``."""
    if head_dropout > 0.0:
        features = F.dropout(features, p=head_dropout, training=True)
    return backbone.get_classifier()(features)


# --------------------------------------------------------------------------------------------------- storage
_MEMORY: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()


class FeatureStore:
    """Where cached features live: this process's memory, or safetensors files (never pickles).

    Disk entries are written to a temporary file in the same folder and renamed into place (``os.replace``), so a
    reader never sees half a file; an unreadable entry counts as missing and is written again. Memory entries are
    kept for the last few keys of the process (so that ``cvft compare`` running fits one after another reuses
    them).

    Args:
        kind: ``"memory"`` or ``"disk"``.
        folder: Folder of the disk entries; default ``$CVFT_CACHE/features``.
    """

    def __init__(self, kind: str, folder: str | Path | None = None) -> None:
        if kind not in ("memory", "disk"):
            raise ValueError(f"FeatureStore kind must be 'memory' or 'disk', got {kind!r}.")
        if folder is None:
            from cvft.backbones.sources import cache_dir

            folder = cache_dir() / "features"
        self.kind, self.folder = kind, Path(folder)

    def path(self, key: str, label: str) -> Path:
        """The file of entry ``key`` (``label`` makes it readable: backbone and split)."""
        return self.folder / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}-{key[:24]}.safetensors"

    def load(self, key: str, label: str) -> tuple[Tensor, Tensor] | None:
        """The ``(features, targets)`` stored under ``key``, or ``None``."""
        if self.kind == "memory":
            entry = _MEMORY.get(key)
            if entry is not None:
                _MEMORY.move_to_end(key)
            return entry
        path = self.path(key, label)
        if not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                if metadata.get("format") != _FORMAT or metadata.get("key") != key:
                    return None
                return handle.get_tensor("features"), handle.get_tensor("targets")
        except Exception as error:  # a damaged entry is a cache miss, never a failed run
            _logger.warning(
                "Ignoring unreadable feature cache file %s (%s); computing the features again.", path, error
            )
            return None

    def save(self, key: str, label: str, features: Tensor, targets: Tensor, description: str = "") -> Path | None:
        """Store an entry; return the file written (``None`` in memory)."""
        if self.kind == "memory":
            _MEMORY[key] = (features, targets)
            _MEMORY.move_to_end(key)
            while len(_MEMORY) > _MEMORY_ENTRIES:
                _MEMORY.popitem(last=False)
            return None
        from safetensors.torch import save_file

        path = self.path(key, label)
        tensors = {"features": features.contiguous(), "targets": targets.contiguous()}
        with atomic_path(path, fsync=True) as partial:
            save_file(tensors, str(partial), metadata={"format": _FORMAT, "key": key, "description": description})
        return path


# --------------------------------------------------------------------------------------------------- the decision
def check_cacheable(module: Any, datamodule: Any) -> CacheDecision:
    """Whether the backbone's features on the training images stay the same at every epoch of this fit.

    They do when every strategy trains the head only (:attr:`~cvft.strategies.Strategy.trains_head_only`:
    ``linear_probe`` without ``train_bn``, ``classifier_only``), only the classifier trains, every BatchNorm layer
    outside it holds its statistics, the training preprocessing is not random
    (``augment="none"``, no random erasing, no user ``train_transform``), and the frozen
    network gives the same output in training and evaluation mode on real training images. Dropout applied by the
    head to the pooled features (timm's ``drop_rate``) is allowed: it is replayed on the cached features, with the
    same random draws.

    Args:
        module: The :class:`~cvft.tasks.ImageClassifier` (``backbone`` and ``strategy_stack``).
        datamodule: The fit's DataModule (its ``datasets`` must hold the training split).

    Returns:
        The decision with its reason.
    """
    from cvft.data.split_module import SplitDataModule

    if getattr(module, "mixer", None) is not None:
        return CacheDecision(False, "mixup/cutmix mix the training images at every step (set mixup=0 and cutmix=0)")
    if not isinstance(datamodule, SplitDataModule):
        return CacheDecision(False, "the training data does not come from a cvft DataModule")
    names = [strategy.name for strategy in module.strategy_stack]
    if not names or not all(strategy.trains_head_only for strategy in module.strategy_stack):
        listed = ",".join(names) if names else "none (full fine-tuning)"
        return CacheDecision(
            False, f"strategies={listed} train the backbone; only linear_probe or classifier_only keep it fixed"
        )
    if any(getattr(strategy, "train_bn", False) for strategy in module.strategy_stack):
        return CacheDecision(False, "linear_probe(train_bn=True) updates BatchNorm layers, so the features move")
    backbone: nn.Module = module.backbone
    head_ids = {id(p) for p in backbone.get_classifier().parameters()}
    outside = [name for name, p in backbone.named_parameters() if p.requires_grad and id(p) not in head_ids]
    if outside:
        return CacheDecision(False, f"parameters outside the classifier train ({', '.join(outside[:3])} ...)")
    moving = _moving_batchnorm(backbone)
    if moving:
        return CacheDecision(False, f"BatchNorm layer {moving} updates its statistics in training mode")
    random_pipeline = getattr(datamodule, "random_training_pipeline", None)
    augment = getattr(datamodule, "augment", None)
    if callable(random_pipeline):
        reason = random_pipeline()
    elif augment != "none":
        reason = f"augment={augment!r} draws new random views every epoch (pass --data.augment none to cache)"
    else:
        reason = None
    if reason is not None:
        return CacheDecision(False, reason)
    dataset = datamodule.datasets.get("train")
    if dataset is None or len(dataset) == 0 or not hasattr(dataset, "samples"):
        return CacheDecision(False, "the DataModule has no image training split to cache")
    shape = _input_shape(module, datamodule, dataset)
    if shape is None:
        return CacheDecision(False, "training items are not single images")
    return _probe(backbone, shape, names)


def _moving_batchnorm(backbone: nn.Module) -> str | None:
    from cvft.strategies._freeze import has_frozen_stats

    head_modules = {id(m) for m in backbone.get_classifier().modules()}
    for name, layer in backbone.named_modules():
        if isinstance(layer, _BatchNorm) and id(layer) not in head_modules and not has_frozen_stats(layer):
            return name  # Lightning puts it in training mode: batch statistics, moving running statistics
    return None


def _input_shape(module: Any, datamodule: Any, dataset: Any) -> tuple[int, ...] | None:
    """``(C, H, W)`` of a training input, from the DataModule's options (one decoded image if it has none)."""
    size = getattr(datamodule, "image_size", None)
    if isinstance(size, int):
        return (int(module.hparams.get("in_chans", 3)), size, size)
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return (int(module.hparams.get("in_chans", 3)), int(size[0]), int(size[1]))
    image = dataset[0][0]
    return tuple(image.shape) if image.ndim == 3 else None


def _probe(backbone: nn.Module, shape: tuple[int, ...], names: list[str]) -> CacheDecision:
    """Run a fixed random batch through the frozen network in evaluation and training mode and compare.

    Detects what the static checks cannot see: dropout or drop-path active in the frozen part, and the head's
    dropout on the pooled features (replayable on cached features only if it is exactly ``F.dropout(drop_rate)``).
    """
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, *shape, generator=generator).to(next(backbone.parameters()).device)
    rates = _dropout_rates(backbone)
    with _preserved_state(backbone, images.device), torch.no_grad():
        backbone.eval()
        body = backbone.forward_features(images)
        reference = backbone.forward_head(body, pre_logits=True)
        if not torch.allclose(backbone.get_classifier()(reference), backbone(images), atol=1e-5, rtol=1e-4):
            return CacheDecision(False, "get_classifier() on forward_head(pre_logits=True) does not give the logits")
        backbone.train()
        torch.manual_seed(0)
        if not torch.equal(backbone.forward_features(images), body):
            return CacheDecision(False, "the frozen backbone is random in training mode (dropout or drop-path)")
        torch.manual_seed(0)
        trained = backbone.forward_head(body, pre_logits=True)
        head_dropout = 0.0
        if not torch.equal(trained, reference):
            for rate in rates:
                torch.manual_seed(0)
                if torch.equal(F.dropout(reference, rate, training=True), trained):
                    head_dropout = rate
                    break
            else:
                return CacheDecision(False, "the head's pooling is random in training mode in a way cvft cannot replay")
    why = f"{'+'.join(names)} keeps the backbone fixed and augment='none' preprocesses every image the same way"
    if head_dropout:
        why += f" (the head's dropout p={head_dropout:g} is applied to the cached features)"
    return CacheDecision(True, why, head_dropout)


def _dropout_rates(backbone: nn.Module) -> list[float]:
    """Candidate rates of the head's dropout: timm's ``drop_rate`` and unguarded dropout layers outside the head."""
    from cvft.strategies._freeze import has_frozen_stats

    rates = [float(getattr(backbone, "drop_rate", 0.0) or 0.0)]
    head_modules = {id(m) for m in backbone.get_classifier().modules()}
    for layer in backbone.modules():
        if isinstance(layer, nn.Dropout) and id(layer) not in head_modules and not has_frozen_stats(layer):
            rates.append(float(layer.p))
    return sorted({rate for rate in rates if rate > 0.0})


@contextmanager
def _preserved_state(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Restore module modes afterwards, and leave the global random state untouched (the fit's shuffling)."""
    modes = [(m, m.training) for m in model.modules()]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training


# --------------------------------------------------------------------------------------------------- keys
def _tensor_digest(model: nn.Module, skip_prefix: str | None) -> str:
    digest = hashlib.blake2b(digest_size=20)
    for name, tensor in model.state_dict().items():
        if skip_prefix is not None and (name == skip_prefix or name.startswith(skip_prefix + ".")):
            continue
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        if data.numel():
            digest.update(data.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _classifier_prefix(backbone: nn.Module) -> str | None:
    classifier = backbone.get_classifier()
    return next((name for name, m in backbone.named_modules() if m is classifier), None)


def _dataset_digest(dataset: Any) -> str:
    digest = hashlib.blake2b(digest_size=20)
    images = getattr(dataset, "images", None)
    if isinstance(images, np.ndarray):  # in-memory arrays (MedMNIST): their bytes are the content
        digest.update(f"{images.dtype}|{images.shape}|".encode())
        digest.update(np.ascontiguousarray(images).data)
        for sample in dataset.samples:
            digest.update(f"{getattr(sample, 'target', None)}\n".encode())
        return digest.hexdigest()
    for sample in dataset.samples:
        path = getattr(sample, "path", sample)
        stat = os.stat(path)
        digest.update(
            f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{getattr(sample, 'target', None)}\n".encode()
        )
    return digest.hexdigest()


def _data_options(datamodule: Any) -> dict[str, Any]:
    options = dict(getattr(datamodule, "hparams", {}) or {})
    return {k: repr(v) for k, v in sorted(options.items()) if k not in _DATA_OPTIONS_IGNORED}


def cache_key(
    module: Any, datamodule: Any, dataset: Any, split: str, weights_digest: str, precision: str, device: str
) -> str:
    """The key of a split's features (see the module docstring for what it covers)."""
    parts = {
        "format": _FORMAT,
        "backbone": module.hparams.get("backbone"),
        "backbone_kwargs": repr(module.hparams.get("backbone_kwargs")),
        "in_chans": module.hparams.get("in_chans"),
        "weights": weights_digest,
        "transform": repr(getattr(dataset, "transform", None)),
        "data_module": type(datamodule).__qualname__,
        "data_options": _data_options(datamodule),
        "dataset": f"{type(dataset).__qualname__}|{len(dataset)}|{getattr(dataset, 'channels', None)}",
        "files": _dataset_digest(dataset),
        "split": split,
        "precision": precision,
        "device": device,
        "versions": f"torch {torch.__version__}, timm {timm.__version__}",
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------- the fit
@dataclass
class ActiveFeatureCache:
    """The feature cache of a fit: placeholders put into the DataModule at ``setup``, then filled.

    Lightning builds the training DataLoader, and starts its iterator (worker processes included), while the
    optimizers are configured (to count the steps). The module's ``setup`` hook comes before that but before the
    model is on its device; so ``setup`` puts :class:`FeatureDataset` placeholders of the right length into the
    DataModule, and :meth:`fill` (called first thing in ``configure_optimizers``: model on its device, precision
    applied, resumed weights restored) loads or computes the features before any DataLoader exists.

    Attributes:
        decision: Why the cache is on.
        store: Where the features live.
        computed: Splits whose features were computed in this fit (the others came from the store).
        files: Disk entries by split (empty in memory).
    """

    decision: CacheDecision
    store: FeatureStore
    computed: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    filled: bool = False
    _images: dict[str, Any] = field(default_factory=dict, repr=False)
    _placeholders: dict[str, FeatureDataset] = field(default_factory=dict, repr=False)
    _datamodule: Any = field(default=None, repr=False)

    def fill(self, trainer: Any, module: Any) -> None:
        """Load each split's features from the store, or compute and store them; log what happened (once)."""
        if self.filled:
            return
        self.filled = True
        backbone = module.backbone
        device = next(backbone.parameters()).device
        weights = _tensor_digest(backbone, _classifier_prefix(backbone))  # after a resumed checkpoint was restored
        precision = str(getattr(trainer, "precision", "32-true"))
        for split, dataset in self._images.items():
            key = cache_key(module, self._datamodule, dataset, split, weights, precision, device.type)
            label = f"{module.hparams.get('backbone')}-{split}"
            entry = self.store.load(key, label)
            if entry is None:
                entry = _extract(trainer, backbone, self._datamodule, dataset, split, device)
                self.store.save(key, label, *entry, description=f"{label}, {len(dataset)} images")
                self.computed.append(split)
            if self.store.kind == "disk":
                self.files[split] = self.store.path(key, label)
            self._placeholders[split].fill(*entry)
        reused = [s for s in self._images if s not in self.computed]
        where = f"disk, {self.store.folder}" if self.store.kind == "disk" else "memory"
        _logger.info(
            "Feature cache on (%s): %s. Features computed for %s, reused for %s; epochs train the head on them.",
            where, self.decision.reason, ", ".join(self.computed) or "no split", ", ".join(reused) or "no split",
        )  # fmt: skip

    def restore(self) -> None:
        """Give the DataModule its image datasets back."""
        if self._datamodule is not None:
            for split, dataset in self._images.items():
                if self._datamodule.datasets.get(split) is self._placeholders[split]:
                    self._datamodule.datasets[split] = dataset
        self._datamodule = None


def activate_feature_cache(trainer: Any, module: Any, mode: str) -> ActiveFeatureCache | None:
    """At ``setup("fit")``: decide, and put feature placeholders in place of the DataModule's train / val images.

    Call :meth:`ActiveFeatureCache.fill` before Lightning builds the DataLoaders, with the model on its device, and
    :meth:`ActiveFeatureCache.restore` at teardown.

    Args:
        trainer: The fitting Trainer (its DataModule's datasets are set up).
        module: The :class:`~cvft.tasks.ImageClassifier`.
        mode: One of :data:`FEATURE_CACHE_MODES`.

    Returns:
        The cache, or ``None`` when features are not cached (the reason is logged).

    Raises:
        ConfigError: ``mode`` is ``memory`` or ``disk`` but the features would not stay the same across epochs.
    """
    if mode not in FEATURE_CACHE_MODES:
        raise ConfigError(f"Unknown feature_cache {mode!r}; choose one of {', '.join(FEATURE_CACHE_MODES)}.")
    if mode == "off":
        _logger.info("Feature cache off (feature_cache='off').")
        return None
    datamodule = trainer.datamodule
    decision = check_cacheable(module, datamodule)
    if not decision.use:
        if mode != "auto":
            raise ConfigError(
                f"feature_cache={mode!r} cannot be used: {decision.reason}. Use feature_cache='auto' (caches only when "
                "it gives the same training) or 'off'."
            )
        _logger.info("Feature cache off: %s.", decision.reason)
        return None
    active = ActiveFeatureCache(
        decision, FeatureStore("memory" if mode == "memory" else "disk"), _datamodule=datamodule
    )
    for split in _CACHED_SPLITS:
        dataset = datamodule.datasets.get(split)
        if dataset is not None and len(dataset):
            active._images[split] = dataset
            active._placeholders[split] = datamodule.datasets[split] = FeatureDataset.placeholder(len(dataset))
    return active


def _extract(trainer: Any, backbone: nn.Module, datamodule: Any, dataset: Any, split: str, device: torch.device):
    """One pass of the frozen backbone (evaluation mode, the fit's precision) over ``dataset`` in order."""
    from tqdm.auto import tqdm

    loader = datamodule._loader(dataset, train=False)
    show = (
        bool(getattr(trainer, "is_global_zero", True)) and getattr(trainer, "progress_bar_callback", None) is not None
    )
    features, targets = [], []
    context = trainer.precision_plugin.forward_context() if hasattr(trainer, "precision_plugin") else _nothing()
    with _preserved_state(backbone, device), torch.no_grad(), context:
        backbone.eval()
        for batch in tqdm(loader, desc=f"Caching {split} features", disable=not show, leave=False):
            images = batch[0].to(device, non_blocking=True)
            pooled = backbone.forward_head(backbone.forward_features(images), pre_logits=True)
            features.append(pooled.float().cpu())
            targets.append(batch[1])
    return torch.cat(features), torch.cat(targets)


@contextmanager
def _nothing() -> Iterator[None]:
    yield
