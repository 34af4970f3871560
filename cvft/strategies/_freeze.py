"""Private freezing machinery shared by the strategies.

Freezing a parameter means ``requires_grad=False``. Freezing a BatchNorm layer additionally means its running
statistics must not move, which ``requires_grad`` alone does not give: Lightning puts the whole model back in
train mode at every epoch. We keep such layers in eval mode with a forward pre-hook, so the guarantee holds in
cvft's modules, on someone else's LightningModule and in a hand-written loop alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from cvft.backbones.layer_groups import head_parameter_names
from cvft.errors import StrategyError

_GUARD_ATTR = "_cvft_frozen_stats_hook"
_NORM_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer (BatchNorm, LayerNorm, GroupNorm, timm's norm variants)."""
    if isinstance(module, _NORM_TYPES):
        return True
    # timm defines norms such as LayerNorm2d, RmsNorm, BatchNormAct2d; recognise them by name
    return "Norm" in type(module).__name__


def is_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` keeps running statistics (any ``_BatchNorm``, including timm's BatchNormAct2d)."""
    return isinstance(module, _BatchNorm)


def set_trainable(model: nn.Module, trainable_names: Iterable[str]) -> None:
    """Make exactly the parameters named in ``trainable_names`` trainable and freeze the rest.

    Training-only modules of objectives (``model.cvft_aux``: projection heads, feature projectors) always stay
    trainable: a parameter strategy decides what of the *backbone* trains.
    """
    wanted = set(trainable_names)
    for name, param in model.named_parameters():
        param.requires_grad_(name in wanted or name.startswith("cvft_aux."))


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that currently require gradients."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


@contextmanager
def temporarily_trainable(tensors: Sequence[Tensor]) -> Iterator[None]:
    """Set ``requires_grad`` on ``tensors`` inside the block and restore each one's own flag after it.

    What a data criterion needs to take gradients of frozen base weights (``sparse``, ``filter_select``).

    Example:
        >>> import torch
        >>> weight = torch.zeros(2)
        >>> with temporarily_trainable([weight]):
        ...     weight.requires_grad
        True
        >>> weight.requires_grad
        False
    """
    flags = [t.requires_grad for t in tensors]
    try:
        for t in tensors:
            t.requires_grad_(True)
        yield
    finally:
        for t, flag in zip(tensors, flags, strict=True):
            t.requires_grad_(flag)


def _keep_eval(module: nn.Module, args: tuple) -> None:
    if module.training:
        module.train(False)


def freeze_batchnorm_stats(module: nn.Module) -> None:
    """Keep a BatchNorm layer's running statistics fixed whatever mode its parent is put in."""
    if getattr(module, _GUARD_ATTR, None) is None:
        setattr(module, _GUARD_ATTR, module.register_forward_pre_hook(_keep_eval))
    module.train(False)


def release_batchnorm_stats(module: nn.Module, training: bool) -> None:
    """Undo :func:`freeze_batchnorm_stats`; ``training`` is the mode the layer should take now."""
    handle = getattr(module, _GUARD_ATTR, None)
    if handle is not None:
        handle.remove()
        delattr(module, _GUARD_ATTR)
        module.train(training)


def has_frozen_stats(module: nn.Module) -> bool:
    """Whether :func:`freeze_batchnorm_stats` currently guards ``module``."""
    return getattr(module, _GUARD_ATTR, None) is not None


def sync_batchnorm_stats(model: nn.Module, train_bn: bool, only: set[str] | None = None) -> None:
    """Fix the statistics of every BatchNorm layer that has a frozen parameter, and release the others.

    With ``train_bn=True``, BatchNorm layers are left alone (their statistics keep updating in train mode).

    Args:
        model: The model whose BatchNorm layers to update.
        train_bn: Whether BatchNorm layers should keep training even where the rest is frozen.
        only: Touch only BatchNorm layers owning one of these parameter names (a strategy's own scope).
    """
    for module_name, module in model.named_modules():
        if not is_batchnorm(module):
            continue
        if only is not None:
            prefix = f"{module_name}." if module_name else ""
            if not any(prefix + n in only for n, _ in module.named_parameters(recurse=False)):
                continue
        params = list(module.parameters(recurse=False))
        frozen = any(not p.requires_grad for p in params) if params else True
        if frozen and not train_bn:
            freeze_batchnorm_stats(module)
        else:
            release_batchnorm_stats(module, model.training)


def _parameter_names_of(model: nn.Module, is_wanted: Callable[[nn.Module], bool]) -> set[str]:
    names: set[str] = set()
    for module_name, module in model.named_modules():
        if is_wanted(module):
            prefix = f"{module_name}." if module_name else ""
            names.update(prefix + n for n, _ in module.named_parameters(recurse=False))
    return names


def batchnorm_parameter_names(model: nn.Module) -> set[str]:
    """Names of the affine parameters of every BatchNorm layer in ``model``."""
    return _parameter_names_of(model, is_batchnorm)


def norm_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters of every normalisation layer in ``model``."""
    return _parameter_names_of(model, is_norm_layer)


def require_head(model: nn.Module, method: str, train_head: bool) -> set[str]:
    """The classifier head's parameter names when ``train_head``; refuse a model without a head then.

    Example:
        >>> import timm
        >>> sorted(require_head(timm.create_model("test_vit", num_classes=3), "vpt", True))
        ['head.bias', 'head.weight']
    """
    if not train_head:
        return set()
    head = head_parameter_names(model)
    if not head:
        raise StrategyError(
            f"{method}: train_head=True needs a classifier head, but {type(model).__name__} has none "
            "(num_classes=0?). Create the backbone with num_classes > 0 or pass train_head=False."
        )
    return head


# --- BatchNorm policy -------------------------------------------------------------------------------------------

#: ``train``: running statistics re-estimated on the new data during training (BN layers in train mode; affine
#: weights still train only where the strategy trains them); ``frozen``: eval mode, pretrained statistics;
#: ``adabn``: statistics re-estimated once on the training data before training, then frozen.
BN_POLICIES: tuple[str, ...] = ("train", "frozen", "adabn")
#: Same string as :data:`cvft.strategies.base.ADAPTER_BUFFERS_ATTR` (not imported: that module imports this one).
_ADAPTER_BUFFERS_ATTR = "adapter_buffer_names"


def check_bn_policy(method: str, bn: str) -> str:
    """``bn`` if it is one of :data:`BN_POLICIES`, else an error naming the allowed values."""
    if bn not in BN_POLICIES:
        raise StrategyError(
            f"{method}: bn={bn!r} is not a BatchNorm policy; choose one of {', '.join(map(repr, BN_POLICIES))} "
            "('train': statistics follow the new data, 'frozen': pretrained statistics in eval mode, "
            "'adabn': re-estimated once on the training data, then frozen)."
        )
    return bn


def _set_stats_travel(module: nn.Module, travel: bool) -> None:
    """Have an adapter file carry (or not) this BatchNorm layer's running statistics."""
    if travel:
        names = tuple(n for n, b in module.named_buffers(recurse=False) if b is not None)
        setattr(module, _ADAPTER_BUFFERS_ATTR, names)
    elif _ADAPTER_BUFFERS_ATTR in vars(module):
        delattr(module, _ADAPTER_BUFFERS_ATTR)


def apply_bn_policy(model: nn.Module, policy: str, only: set[str] | None = None) -> None:
    """Put the BatchNorm layers of ``model`` under ``policy`` (one of :data:`BN_POLICIES`).

    ``frozen`` and ``adabn`` hold every BatchNorm layer with a frozen parameter in eval mode (see
    :func:`sync_batchnorm_stats`); ``train`` releases them all, so their statistics follow the training data.
    Whenever the statistics may move (``train``, ``adabn``), each layer lists its running statistics in
    ``adapter_buffer_names``, so that adapter files carry them and a reloaded adapter reproduces the trained model.
    The re-estimation of ``adabn`` itself happens in :meth:`~cvft.strategies.StrategyStack.calibrate`.

    Args:
        model: The model whose BatchNorm layers to update.
        policy: ``"train"``, ``"frozen"`` or ``"adabn"``.
        only: Touch only BatchNorm layers owning one of these parameter names (a strategy's own scope).
    """
    check_bn_policy("bn", policy)
    sync_batchnorm_stats(model, train_bn=policy == "train", only=only)
    for module_name, module in model.named_modules():
        if not (is_batchnorm(module) and module.track_running_stats):
            continue
        if only is not None:
            prefix = f"{module_name}." if module_name else ""
            if not any(prefix + n in only for n, _ in module.named_parameters(recurse=False)):
                continue
        _set_stats_travel(module, policy != "frozen")
