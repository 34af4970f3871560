"""Reading and writing Lightning checkpoints without ever unpickling a file a user names.

Every checkpoint cvft or its Trainer reads goes through :func:`load_checkpoint`:

* local files and fsspec URLs (``s3://``, ``file://``) are read with ``torch.load(weights_only=True)``;
* ``http(s)://`` URLs are downloaded into cvft's cache (:func:`~cvft.backbones.sources.cache_dir`) and read
  the same way (Lightning's own URL loader would unpickle them with ``weights_only=False``);
* anything else (a pickled object, a truncated or empty file, a file that is not a checkpoint) raises
  :class:`~cvft.errors.CheckpointError` naming the file and the way out.

:class:`SafeCheckpointIO` plugs this into a Lightning ``Trainer`` (``plugins=[SafeCheckpointIO()]``; the ``cvft``
command always uses it) and writes checkpoints atomically: into a temporary file beside the target, then renamed,
so a run killed during a save leaves the previous checkpoint intact and no stray file outside the run folder.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from cvft.atomic import atomic_path
from cvft.backbones.sources import cache_dir
from cvft.errors import CheckpointError
from cvft.signatures import forwarded_signature

__all__ = [
    "load_checkpoint",
    "load_module",
    "download",
    "is_url",
    "atomic_torch_save",
    "SafeCheckpointIO",
    "weights_from_checkpoint",
    "loadable_hparams",
    "save_loadable_hparams",
    "with_legacy_hparams",
]


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is an ``http(s)://`` URL, which cvft downloads (:func:`download`) before reading.

    Example:
        >>> is_url("https://example.org/model.ckpt"), is_url("runs/model.ckpt")
        (True, False)
    """
    return isinstance(location, str) and location.startswith(("http://", "https://"))


_FIX = (
    "Pass a .ckpt written by `cvft fit` (runs/<name>/version_<n>/checkpoints/), or re-save your weights as a plain "
    "state dict (torch.save(model.state_dict(), path)) or as .safetensors"
)


def download(url: str) -> Path:
    """Download ``url`` once into cvft's cache (atomically, by torch.hub) and return the local copy."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    name = Path(url.split("?", 1)[0]).name or "checkpoint.ckpt"
    target = cache_dir() / "checkpoints" / f"{digest}-{name}"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), progress=False)
    except Exception as error:  # URLError, HTTPError, timeouts, SSL errors …
        raise CheckpointError(
            f"Cannot download checkpoint {url} ({type(error).__name__}: {error}). Check the URL and the network, or "
            f"download the file yourself and pass its local path."
        ) from error
    return target


def load_checkpoint(
    path: str | os.PathLike[str], map_location: Any = "cpu", require_lightning: bool = False
) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``, whatever its location; never unpickle it.

    Args:
        path: Local path, ``http(s)://`` URL (downloaded into cvft's cache first) or fsspec URL.
        map_location: Where tensors go, as for ``torch.load``.
        require_lightning: Also require a Lightning checkpoint (a mapping with a ``state_dict``).

    Returns:
        The checkpoint mapping.

    Raises:
        CheckpointError: The file is missing, empty, truncated, holds pickled Python objects, is not a mapping, or
            (with ``require_lightning``) holds no ``state_dict``. The message names the file and the fix.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "model.ckpt"
        >>> torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, path)
        >>> load_checkpoint(path, require_lightning=True)["epoch"]
        3
        >>> _ = path.write_bytes(b"")
        >>> try:
        ...     load_checkpoint(path)
        ... except CheckpointError as error:
        ...     print("is empty" in str(error))
        True
    """
    text = os.fspath(path)
    local = download(text) if is_url(text) else None
    shown = text if local is None else f"{text} (downloaded to {local})"
    if local is None and "://" not in text:
        local = Path(text).expanduser()
        if not local.exists():
            raise CheckpointError(f"Checkpoint {text} does not exist (looked at {local.resolve()}). {_FIX}.")
        if not local.is_file():
            raise CheckpointError(f"Checkpoint {text} is not a file. {_FIX}.")
        if local.stat().st_size == 0:
            raise CheckpointError(f"Checkpoint {text} is empty (0 bytes): it was not written completely. {_FIX}.")
    try:
        if local is not None:
            checkpoint = torch.load(local, map_location=map_location, weights_only=True)
        else:
            from lightning.fabric.utilities.cloud_io import get_filesystem

            with get_filesystem(text).open(text, "rb") as handle:
                checkpoint = torch.load(io.BytesIO(handle.read()), map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except Exception as error:  # UnpicklingError, RuntimeError (zip), EOFError, OSError …
        raise CheckpointError(_load_failure(shown, error)) from None
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"Checkpoint {shown} holds a {type(checkpoint).__name__}, not a mapping. {_FIX}.")
    if require_lightning and not isinstance(checkpoint.get("state_dict"), Mapping):
        keys = sorted(str(k) for k in checkpoint)[:8]
        raise CheckpointError(
            f"{shown} is not a Lightning checkpoint (no 'state_dict'; top-level keys: {keys}). To start from plain "
            f"weights use --model.weights {text} instead of --ckpt_path; to resume, pass a .ckpt from `cvft fit`."
        )
    return dict(checkpoint)


def _load_failure(shown: str, error: Exception) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()  # torch's message carries terminal colour codes
    detail = f"{type(error).__name__}: {text.splitlines()[0][:200] if text else ''}"
    if "weights_only" in str(error) or "Unsupported global" in str(error) or "GLOBAL" in str(error):
        reason = (
            "it holds pickled Python objects, and for safety cvft loads only plain tensors and containers "
            "(torch.load(weights_only=True)), never code from a file"
        )
    elif isinstance(error, EOFError) or "PytorchStreamReader" in str(error) or "zip archive" in str(error):
        reason = "it is truncated or not a PyTorch file (an interrupted copy or save?)"
    else:
        reason = "it is not a readable PyTorch checkpoint"
    return f"Cannot load checkpoint {shown}: {reason} ({detail}). {_FIX}."


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` through :func:`cvft.atomic.atomic_path` (temporary file beside ``path``, fsynced, renamed).

    A crash or ``kill -9`` mid-write leaves the previous file intact and no stray file behind.

    Example:
        >>> import tempfile
        >>> path = atomic_torch_save({"x": torch.zeros(1)}, Path(tempfile.mkdtemp()) / "a" / "b.ckpt")
        >>> sorted(p.name for p in path.parent.iterdir())
        ['b.ckpt']
    """
    with atomic_path(path, fsync=True) as partial:
        torch.save(obj, partial)
    return Path(path)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that never unpickles and never leaves half-written checkpoints.

    * ``load_checkpoint`` reads through :func:`load_checkpoint` (``weights_only=True`` always, URLs downloaded
      first, cvft errors naming the file); a caller's ``weights_only=False`` is ignored.
    * ``save_checkpoint`` writes local files with :func:`atomic_torch_save` (temporary file beside the target) and
      leaves remote ones to Lightning.

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(plugins=[SafeCheckpointIO()], logger=False)
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` atomically (local paths) or through Lightning (remote URLs)."""
        if "://" in os.fspath(path) or storage_options is not None:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        """Read a checkpoint with ``weights_only=True`` whatever ``weights_only`` says (see :func:`load_checkpoint`)."""
        location = map_location if map_location is not None else (lambda storage, loc: storage)
        return load_checkpoint(path, map_location=location, require_lightning=True)


def load_module(
    cls: type[Any], path: str | os.PathLike[str] | Mapping[str, Any], map_location: Any = "cpu", **overrides: Any
) -> Any:
    """``cls.load_from_checkpoint`` through :func:`load_checkpoint`: never unpickled, cvft errors naming the file.

    Args:
        cls: A LightningModule class whose ``__init__`` arguments the checkpoint's ``hyper_parameters`` hold.
        path: Local path or URL of a Lightning checkpoint, or a checkpoint already read by :func:`load_checkpoint`.
        map_location: Where tensors go, as for ``torch.load`` (with a path).
        **overrides: Constructor arguments that replace the saved hyper-parameters.

    Returns:
        The module, its weights loaded from the checkpoint.

    Raises:
        CheckpointError: The file cannot be read safely or is not a Lightning checkpoint.
    """
    from lightning.pytorch.core.saving import _load_state
    from lightning.pytorch.utilities.migration import pl_legacy_patch
    from lightning.pytorch.utilities.migration.utils import _pl_migrate_checkpoint

    if isinstance(path, Mapping):
        checkpoint = dict(path)
    else:
        checkpoint = load_checkpoint(path, map_location=map_location, require_lightning=True)
    with pl_legacy_patch():
        checkpoint = _pl_migrate_checkpoint(checkpoint, checkpoint_path=None)
    hparams = with_legacy_hparams(cls, checkpoint.get(cls.CHECKPOINT_HYPER_PARAMS_KEY, {}))
    checkpoint[cls.CHECKPOINT_HYPER_PARAMS_KEY] = {**hparams, **overrides}
    return _load_state(cls, checkpoint, **overrides)


def with_legacy_hparams(cls: type[Any], hparams: Mapping[str, Any]) -> dict[str, Any]:
    """``hparams`` saved by an older release, with ``cls.legacy_hparams`` filling the options it did not record yet.

    An option added later gets a new default, but a file written before it was trained with the old behaviour:
    ``cls.legacy_hparams`` names that value (e.g. ``ObjectDetector``'s ``box_activation: relu``), so checkpoints and
    adapter files keep predicting as they did. Values the file records win.

    Example:
        >>> class Task:
        ...     legacy_hparams = {"box_activation": "relu"}
        >>> with_legacy_hparams(Task, {"lr": 0.1}), with_legacy_hparams(Task, {"box_activation": "exp"})
        ({'box_activation': 'relu', 'lr': 0.1}, {'box_activation': 'exp'})
    """
    return {**getattr(cls, "legacy_hparams", {}), **hparams}


@contextmanager
def weights_from_checkpoint() -> Iterator[None]:
    """Build a task module whose weights a checkpoint will replace, without its "random initialisation" warning.

    The tasks (``cvft.tasks.*``) warn when a backbone starts without pretrained weights; that is wrong when the
    weights come from a checkpoint loaded right after (predict, resume, a checkpoint teacher).

    Example:
        >>> from cvft.tasks import ImageClassifier
        >>> with weights_from_checkpoint():
        ...     model = ImageClassifier("test_resnet", pretrained=False, num_classes=2)
    """
    log = logging.getLogger("cvft.tasks")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def save_loadable_hparams(module: Any, frame: FrameType | None, ignore: Sequence[str] = ()) -> None:
    """Save the arguments of the constructor running in ``frame`` as ``module.hparams``, as plain data.

    Lightning's ``save_hyperparameters(frame=...)`` followed by :func:`loadable_hparams`, so the checkpoint loads with
    ``torch.load(weights_only=True)``. Options the constructor forwards to a base class with ``**kwargs`` are
    recorded with their defaults when not given (:func:`~cvft.signatures.forwarded_signature`), like its own.

    Args:
        module: A LightningModule or LightningDataModule.
        frame: The frame of its ``__init__`` (``inspect.currentframe().f_back`` in a helper it calls).
        ignore: Arguments to leave out.
    """
    module.save_hyperparameters(ignore=list(ignore), frame=frame)
    for name, parameter in forwarded_signature(type(module)).parameters.items():
        if name not in module.hparams and name not in ignore and parameter.default is not parameter.empty:
            module.hparams[name] = parameter.default
    loadable_hparams(module)


def loadable_hparams(module: Any) -> None:
    """Make ``module.hparams`` plain data, so a checkpoint of it loads with ``torch.load(weights_only=True)``.

    ``save_hyperparameters`` records constructor arguments as given; a ``pathlib.Path`` (``root=Path("data")``,
    ``weights=Path(...)``) would be pickled as a ``PosixPath`` object, which a safe load refuses. Path-like values,
    also inside lists, tuples and dicts, become strings.

    Example:
        >>> from types import SimpleNamespace
        >>> module = SimpleNamespace(hparams={"root": Path("data"), "sizes": (Path("a"), 2)})
        >>> loadable_hparams(module)
        >>> module.hparams
        {'root': 'data', 'sizes': ['a', 2]}
    """
    for key, value in list(module.hparams.items()):
        module.hparams[key] = _plain(value)


def _plain(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value
