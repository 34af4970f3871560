"""Reading weight files safely and fitting their keys to a backbone.

Only plain tensors are ever read: ``.safetensors`` through safetensors, everything else through
``torch.load(..., weights_only=True)``. Nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from cvft.errors import WeightsError

__all__ = [
    "SUPPORTED_SUFFIXES",
    "Checkpoint",
    "read_checkpoint",
    "load_state_dict_file",
    "strip_key_prefix",
    "read_safetensors",
    "write_safetensors_atomic",
]

_logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_NESTING_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "module")
_ARCH_KEYS = ("backbone", "architecture", "arch", "model_name", "backbone_name")


@dataclass
class Checkpoint:
    """Tensors read from a weights file, plus what the file says about its origin.

    Attributes:
        path: Absolute path of the file.
        state_dict: Parameter / buffer name to tensor, unwrapped from any ``state_dict``/``model`` nesting.
        metadata: String metadata (safetensors header) or ``{}``.
        architecture: Backbone name the file seems to come from (safetensors metadata, ``pretrained_cfg``,
            Lightning ``hyper_parameters``), or ``None`` when unknown.
    """

    path: Path
    state_dict: dict[str, Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    architecture: str | None = None


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a weights file into a :class:`Checkpoint` without unpickling anything.

    Args:
        path: A ``.safetensors``, ``.pth``, ``.pt``, ``.bin`` or Lightning ``.ckpt`` file, local or an
            ``http(s)://`` URL (downloaded into cvft's cache first).

    Returns:
        The unwrapped state dict, metadata and architecture hint.

    Raises:
        WeightsError: The file is missing, has an unknown suffix, holds pickled objects, or holds no tensors.

    Example:
        >>> ckpt = read_checkpoint("runs/best.ckpt")  # doctest: +SKIP
        >>> ckpt.architecture, len(ckpt.state_dict)  # doctest: +SKIP
        ('resnet50', 320)
    """
    from cvft.checkpoints import download, is_url

    if is_url(path):
        path = download(path)
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise WeightsError(
            f"Weights file not found: {path}. Pass the path of an existing .safetensors, .pth, .pt, .bin or "
            f"Lightning .ckpt file (CLI: --model.weights PATH)."
        )
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise WeightsError(
            f"Unsupported weights file type {suffix!r}: {path}. Use one of {', '.join(SUPPORTED_SUFFIXES)}; "
            f"convert other formats to .safetensors first."
        )
    if suffix == ".safetensors":
        state_dict, metadata = read_safetensors(path)
        return Checkpoint(path, state_dict, metadata, _architecture_from_metadata(metadata))
    from cvft.checkpoints import load_checkpoint

    raw = load_checkpoint(path)
    state_dict = _unwrap_state_dict(raw, path)
    return Checkpoint(path, state_dict, {}, _architecture_from_object(raw))


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read the tensors of a weights file (see :func:`read_checkpoint` for formats and metadata).

    Args:
        path: A ``.safetensors``, ``.pth``, ``.pt``, ``.bin`` or Lightning ``.ckpt`` file.

    Returns:
        Name to tensor, unwrapped from ``state_dict``/``model`` nesting; key prefixes are left as they are.

    Example:
        >>> sd = load_state_dict_file("adapter.safetensors")  # doctest: +SKIP
        >>> sorted(sd)[:2]  # doctest: +SKIP
        ['blocks.0.attn.qkv.lora_a', 'blocks.0.attn.qkv.lora_b']
    """
    return read_checkpoint(path).state_dict


def strip_key_prefix(state_dict: Mapping[str, Tensor], model_keys: Iterable[str]) -> tuple[dict[str, Tensor], str]:
    """Remove the module prefix (``model.``, ``module.``, ``model.module.`` …) that best matches ``model_keys``.

    The prefix is found by matching checkpoint keys to the model's own keys, not by a fixed list. Keys that do not
    carry the chosen prefix belong to other parts of the saving module (loss, EMA copy, metrics) and are dropped,
    and so are training-only modules of objectives (``cvft_aux.``: projection heads, feature projectors).

    Args:
        state_dict: Checkpoint tensors.
        model_keys: Keys of the target model's ``state_dict()``.

    Returns:
        The re-keyed state dict and the prefix removed (``""`` when the keys already match).

    Example:
        >>> import torch
        >>> strip_key_prefix({"model.fc.weight": torch.zeros(1)}, ["fc.weight"])[1]
        'model.'
    """
    keys = set(model_keys)
    direct = sum(k in keys for k in state_dict)
    votes: Counter[str] = Counter()
    for key in state_dict:
        parts = key.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[i:]) in keys:
                votes[".".join(parts[:i]) + "."] += 1
                break
    if not votes or votes.most_common(1)[0][1] <= direct:
        return {k: v for k, v in state_dict.items() if not k.startswith("cvft_aux.")}, ""
    prefix = votes.most_common(1)[0][0]
    stripped = {
        k[len(prefix) :]: v
        for k, v in state_dict.items()
        # training-only modules of objectives (projection heads) never belong to the weights of a backbone
        if k.startswith(prefix) and not k[len(prefix) :].startswith("cvft_aux.")
    }
    dropped = len(state_dict) - len(stripped)
    if dropped:
        _logger.info("Ignoring %d checkpoint tensors outside the %r prefix (not in the backbone).", dropped, prefix)
    return stripped, prefix


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file, on CPU.

    Raises:
        WeightsError: The file is corrupt, not safetensors, or holds no tensors.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError
        raise WeightsError(
            f"Cannot read safetensors file {path}: {exc}. The file is corrupt or not safetensors; re-export it "
            f"with safetensors.torch.save_file."
        ) from exc
    if not tensors:
        raise WeightsError(f"Safetensors file {path} contains no tensors; pass a file with model weights.")
    return tensors, metadata


def _unwrap_state_dict(raw: Any, path: Path) -> dict[str, Tensor]:
    obj = raw
    for _ in range(4):  # e.g. {"state_dict": {"model": {...}}}
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return dict(obj)
        nested = next((obj[k] for k in _NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = nested
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
        if tensors:
            return tensors
    found = sorted(raw)[:10] if isinstance(raw, Mapping) else type(raw).__name__
    raise WeightsError(
        f"No state dict found in {path} (top level: {found}). Expected a mapping of tensors, possibly nested under "
        f"one of {list(_NESTING_KEYS)}; save model.state_dict() instead."
    )


def _architecture_from_metadata(metadata: Mapping[str, str]) -> str | None:
    for key in _ARCH_KEYS:
        if metadata.get(key):
            return metadata[key]
    cfg = metadata.get("pretrained_cfg")
    if cfg:
        try:
            return json.loads(cfg).get("architecture")
        except (ValueError, AttributeError):
            return None
    return None


def _architecture_from_object(raw: Any) -> str | None:
    if not isinstance(raw, Mapping):
        return None
    candidates: list[Any] = [raw, raw.get("pretrained_cfg"), raw.get("hyper_parameters"), raw.get("hparams")]
    hparams = raw.get("hyper_parameters")
    if isinstance(hparams, Mapping):  # jsonargparse / LightningCLI nests init args one level down
        candidates += [v for v in hparams.values() if isinstance(v, Mapping)]
    for cand in candidates:
        if isinstance(cand, Mapping):
            for key in _ARCH_KEYS:
                if isinstance(cand.get(key), str):
                    return cand[key]
    return None


def write_safetensors_atomic(
    tensors: Mapping[str, Tensor], target: str | Path, metadata: Mapping[str, str], hint: str = ""
) -> Path:
    """Write a safetensors file atomically: to a temporary file beside ``target``, then rename.

    A crash or a full disk never leaves a half-written file under ``target``. The file gets the permissions any
    other output gets (``0o666`` minus the umask).

    Raises:
        WeightsError: The folder is not writable; the message names ``target`` and adds ``hint``.
    """
    from safetensors.torch import save_file

    from cvft.atomic import atomic_path

    target = Path(target)
    try:
        with atomic_path(target) as partial:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, partial, metadata=dict(metadata))
    except OSError as exc:
        raise WeightsError(f"Cannot write {target}: {exc}. {hint}".rstrip()) from exc
    return target
