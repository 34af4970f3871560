"""Strategies that choose which existing parameters train: the freezing family.

Every strategy here sets an exact trainable set in :meth:`~cvft.strategies.Strategy.setup` and fixes BatchNorm
running statistics in the frozen part of the network unless ``train_bn=True``. Put them *before* strategies that
inject modules (LoRA, adapters): a freezing strategy decides the trainable set from scratch.

Trainable parameters, for a model whose classifier is ``head`` (see
:func:`cvft.backbones.layer_groups.head_parameter_names`):

==================  ===================================================================
``full``            every parameter
``linear_probe``    head (+ BatchNorm affine parameters with ``train_bn=True``)
``classifier_only`` head; the whole backbone runs in eval mode (no dropout, fixed stats)
``freeze_layers``   everything but the first ``num_groups`` layer groups / matched groups
``bitfit``          every bias + head
``norm_only``       every normalisation-layer parameter + head
``embedding_only``  the first layer group (patch/position embeddings or CNN stem) + head
==================  ===================================================================
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from cvft.backbones.layer_groups import find_layer_groups, head_parameter_names, layer_groups
from cvft.errors import StrategyError
from cvft.strategies._freeze import (
    batchnorm_parameter_names,
    freeze_batchnorm_stats,
    has_frozen_stats,
    is_batchnorm,
    norm_parameter_names,
    release_batchnorm_stats,
    set_trainable,
)
from cvft.strategies.base import ParameterStrategy, Strategy
from cvft.strategies.registry import register_strategy

__all__ = [
    "FreezingStrategy",
    "FullFineTune",
    "LinearProbe",
    "ClassifierOnly",
    "FreezeLayers",
    "BitFit",
    "NormOnly",
    "EmbeddingOnly",
]

_EVAL_SENSITIVE = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def _require_head(model: nn.Module, strategy: str) -> set[str]:
    head = head_parameter_names(model)
    if not head:
        raise StrategyError(
            f"Strategy {strategy!r} needs a classifier head, but {type(model).__name__} has no `get_classifier()` "
            "or its head has no parameters (num_classes=0?). Create the backbone with num_classes > 0."
        )
    return head


class FreezingStrategy(ParameterStrategy):
    """Base of strategies that train a fixed subset of the existing parameters.

    Subclasses implement :meth:`trainable_names`.

    Args:
        train_bn: Keep BatchNorm layers training in the frozen part: their affine parameters train and their
            running statistics update. With ``False`` (the default) frozen BatchNorm layers stay in eval mode for
            the whole run, even though Lightning switches the model to train mode at every epoch. ``train_bn=True``
            implies ``bn="train"``; ``bn`` alone (``train``/``frozen``/``adabn``, see :mod:`cvft.strategies.base`)
            moves only the running statistics, never the affine parameters.
    """

    def __init__(self, train_bn: bool = False) -> None:
        self.train_bn = bool(train_bn)

    def trainable_names(self, model: nn.Module) -> set[str]:
        """Names of the parameters this strategy trains (before ``train_bn`` is applied)."""
        raise NotImplementedError

    def setup(self, model: nn.Module) -> None:
        """Freeze everything outside :meth:`trainable_names` and fix frozen BatchNorm statistics."""
        names = self.trainable_names(model)
        if self.train_bn:
            names |= batchnorm_parameter_names(model)
        set_trainable(model, names)
        self.apply_bn_policy(model)


@register_strategy
class FullFineTune(Strategy):
    """Train every parameter (the baseline every other strategy is compared with).

    Example:
        >>> import timm
        >>> model = timm.create_model("test_resnet", num_classes=3)
        >>> FullFineTune().setup(model)
        >>> all(p.requires_grad for p in model.parameters())
        True
    """

    name = "full"

    def setup(self, model: nn.Module) -> None:
        """Make every parameter trainable and let every BatchNorm layer update its statistics."""
        for param in model.parameters():
            param.requires_grad_(True)
        for module in model.modules():
            if has_frozen_stats(module):  # also undoes classifier_only's eval guards on dropout / drop-path
                release_batchnorm_stats(module, model.training)


@register_strategy
class LinearProbe(FreezingStrategy):
    """Freeze the backbone and train the classifier head.

    Args:
        train_bn: Also train BatchNorm layers (affine parameters and running statistics).

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit", num_classes=3)
        >>> LinearProbe().setup(model)
        >>> [n for n, p in model.named_parameters() if p.requires_grad]
        ['head.weight', 'head.bias']
    """

    name = "linear_probe"
    trains_head_only = True
    default_lr = 1e-2

    def trainable_names(self, model: nn.Module) -> set[str]:
        """The head's parameters."""
        return _require_head(model, self.name)


@register_strategy
class ClassifierOnly(Strategy):
    """Train only the classifier, with the backbone a fixed feature extractor.

    Unlike :class:`LinearProbe`, the backbone also stays in eval mode: dropout, stochastic depth and BatchNorm
    statistics behave as at inference, so the head sees exactly the features it will see at test time.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_resnet", num_classes=3)
        >>> ClassifierOnly().setup(model)
        >>> _ = model.train()(torch.randn(2, 3, 32, 32))
        >>> model.layer1[0].bn1.training, model.fc.training
        (False, True)
    """

    name = "classifier_only"
    trains_head_only = True
    default_lr = 1e-2

    def setup(self, model: nn.Module) -> None:
        """Freeze all but the head and hold every backbone module in eval mode."""
        head = _require_head(model, self.name)
        set_trainable(model, head)
        head_modules = {id(m) for m in model.get_classifier().modules()}
        for module in model.modules():
            if module is model or id(module) in head_modules:
                continue
            if is_batchnorm(module) or isinstance(module, _EVAL_SENSITIVE) or _is_drop_path(module):
                freeze_batchnorm_stats(module)  # the guard simply holds a module in eval mode


def _is_drop_path(module: nn.Module) -> bool:
    return type(module).__name__ in {"DropPath", "DropBlock2d"}


@register_strategy
class FreezeLayers(FreezingStrategy):
    """Freeze the first ``num_groups`` layer groups, or the groups matching ``patterns``; train the rest.

    Layer groups come from :func:`cvft.backbones.layer_groups.layer_groups` (timm's ``group_matcher``), so
    ``num_groups=1`` freezes the patch embedding of a ViT or the stem of a ResNet. The head never freezes.

    Args:
        num_groups: How many groups to freeze, counted from the stem.
        patterns: Regexes on group names (``blocks.3``, ``layer2``) or parameter names; matched groups freeze.
        train_bn: Keep BatchNorm layers in frozen groups training.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_resnet", num_classes=3)
        >>> FreezeLayers(patterns=[r"^layer1"]).setup(model)
        >>> model.layer1[0].conv1.weight.requires_grad, model.layer2[0].conv1.weight.requires_grad
        (False, True)
    """

    name = "freeze_layers"

    def __init__(
        self, num_groups: int | None = None, patterns: Sequence[str] | None = None, train_bn: bool = False
    ) -> None:
        super().__init__(train_bn)
        if (num_groups is None) == (patterns is None):
            raise StrategyError("freeze_layers needs exactly one of `num_groups` or `patterns`.")
        if num_groups is not None and num_groups < 0:
            raise StrategyError(f"freeze_layers: num_groups must be >= 0, got {num_groups}.")
        self.num_groups = num_groups
        self.patterns = list(patterns) if patterns is not None else None

    def trainable_names(self, model: nn.Module) -> set[str]:
        """Everything outside the frozen groups."""
        groups = layer_groups(model)
        body = [g for g in groups if not g.is_head]
        if self.patterns is not None:
            frozen = [g for g in find_layer_groups(body, self.patterns)]
        else:
            if self.num_groups > len(body):
                raise StrategyError(
                    f"freeze_layers: num_groups={self.num_groups} but {type(model).__name__} has only {len(body)} "
                    f"layer groups below the head ({', '.join(g.name for g in body)})."
                )
            frozen = body[: self.num_groups]
        frozen_names = {n for g in frozen for n in g.parameter_names}
        return {n for n, _ in model.named_parameters() if n not in frozen_names}


@register_strategy
class BitFit(FreezingStrategy):
    """BitFit (Ben Zaken et al., 2022): train only the bias terms, plus the new classifier head.

    Every parameter named ``*.bias`` trains: linear, conv and normalisation biases alike, as in the paper.

    Args:
        train_bn: Also train BatchNorm scales and update BatchNorm statistics.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit", num_classes=3)
        >>> BitFit().setup(model)
        >>> all(n.endswith("bias") or n.startswith("head") for n, p in model.named_parameters() if p.requires_grad)
        True
    """

    name = "bitfit"
    default_lr = 3e-3

    def trainable_names(self, model: nn.Module) -> set[str]:
        """Biases and head."""
        biases = {n for n, _ in model.named_parameters() if n == "bias" or n.endswith(".bias")}
        return biases | _require_head(model, self.name)


@register_strategy
class NormOnly(FreezingStrategy):
    """Train only normalisation layers (LayerNorm, BatchNorm, GroupNorm, timm's variants) and the head.

    Args:
        train_bn: Let BatchNorm running statistics update; by default they stay fixed while the affine
            parameters train.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit", num_classes=3)
        >>> NormOnly().setup(model)
        >>> model.blocks[0].norm1.weight.requires_grad, model.blocks[0].attn.qkv.weight.requires_grad
        (True, False)
    """

    name = "norm_only"

    def trainable_names(self, model: nn.Module) -> set[str]:
        """Normalisation parameters and head."""
        return norm_parameter_names(model) | _require_head(model, self.name)

    def setup(self, model: nn.Module) -> None:
        """Train norms and head; hold BatchNorm statistics fixed unless ``train_bn``."""
        super().setup(model)
        if self.bn_policy != "train":
            for module in model.modules():
                if is_batchnorm(module):
                    freeze_batchnorm_stats(module)


@register_strategy
class EmbeddingOnly(FreezingStrategy):
    """Train only the first layer group (a ViT's patch and position embeddings and tokens, a CNN's stem) and the head.

    Args:
        train_bn: Keep BatchNorm layers outside the stem training.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit", num_classes=3)
        >>> EmbeddingOnly().setup(model)
        >>> sorted(n for n, p in model.named_parameters() if p.requires_grad)[:3]
        ['cls_token', 'head.bias', 'head.weight']
    """

    name = "embedding_only"

    def trainable_names(self, model: nn.Module) -> set[str]:
        """First layer group and head."""
        groups = [g for g in layer_groups(model) if not g.is_head]
        if not groups:
            raise StrategyError(f"embedding_only: {type(model).__name__} has no layer groups below its head.")
        return set(groups[0].parameter_names) | _require_head(model, self.name)
