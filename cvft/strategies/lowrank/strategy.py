"""The low-rank strategy base: validated arguments and one ``setup`` that every low-rank method fills in with hooks.

:meth:`LowRankStrategy.setup` freezes the model, wraps the targets and trains the updates (and the head, and the
adapted layers' biases on request). Wrapping is a template, :meth:`LowRankStrategy.inject`: find the targets,
prepare them (:meth:`~LowRankStrategy.prepare_targets`: QLoRA quantises them), then replace each by the layer the
method builds (:meth:`~LowRankStrategy.make_layer`, or :meth:`~LowRankStrategy.layer_factory` when building depends
on the model or on the other layers: LoRA's fused ``qkv`` projections, shared LoRA's pairs shared by shape).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from torch import nn

from cvft.strategies._freeze import require_head, set_trainable
from cvft.strategies._modules import set_submodule
from cvft.strategies.base import ParameterStrategy
from cvft.strategies.lowrank.layer import LowRankLayer, check_low_rank_hyperparameters
from cvft.strategies.lowrank.merge import low_rank_parameter_names
from cvft.strategies.lowrank.targets import find_low_rank_targets
from cvft.strategies.targets import check_targets

__all__ = ["LayerFactory", "LowRankStrategy", "inject_low_rank", "wrap_layers"]

#: Builds the wrapper of one base layer.
LayerFactory = Callable[[nn.Module], LowRankLayer]


def wrap_layers(model: nn.Module, names: Sequence[str], make_layer: LayerFactory) -> list[str]:
    """Replace the named layers of ``model`` by ``make_layer(layer)``, in place; return the names.

    Each wrapper is moved to its base weight's device and dtype.
    """
    for name in names:
        base = model.get_submodule(name)
        wrapper = make_layer(base)
        set_submodule(model, name, wrapper.to(device=base.weight.device, dtype=base.weight.dtype))
    return list(names)


def inject_low_rank(
    model: nn.Module,
    targets: str | Sequence[str],
    make_layer: Callable[..., LowRankLayer],
    **options: Any,
) -> list[str]:
    """Replace the target layers of ``model`` (see :func:`~cvft.strategies.lowrank.find_low_rank_targets`) in place.

    ``make_layer`` builds the wrapper of one base layer, called as ``make_layer(base, **options)``: a layer class of
    the family (:class:`~cvft.strategies.lora.LoRALinear`, :class:`~cvft.strategies.loha.LoHALayer`,
    :class:`~cvft.strategies.lokr.LoKrLayer` ...) with its arguments as ``options``, or any factory. Each wrapper is
    moved to the base weight's device and dtype. Returns the names of the replaced layers.

    Example:
        >>> import timm
        >>> from cvft.strategies.loha import LoHALayer
        >>> from cvft.strategies.lokr import LoKrLayer
        >>> inject_low_rank(timm.create_model("test_vit"), "vit_attention", LoHALayer, rank=2)[:2]
        ['blocks.0.attn.qkv', 'blocks.0.attn.proj']
        >>> inject_low_rank(timm.create_model("test_resnet"), "resnet_blocks", LoKrLayer, rank=2, factor=4)[:2]
        ['layer1.0.conv1', 'layer1.0.conv2']
    """
    return wrap_layers(model, find_low_rank_targets(model, targets), partial(make_layer, **options))


class LowRankStrategy(ParameterStrategy):
    """Common part of the low-rank strategies (LoRA, LoHA, LoKr, shared LoRA, QLoRA).

    Subclasses set ``name`` and implement :meth:`make_layer`; :meth:`layer_factory` and :meth:`prepare_targets`
    are there when they need more. The arguments below are those of every low-rank strategy, documented here once:
    a subclass declares only the options it adds (keyword-only), forwards these with ``**kwargs`` and documents only
    what it adds or means differently; :func:`~cvft.strategies.registry.strategy_signature` lists and checks them all.
    Every wrapper is a low-rank layer, so ``merge_low_rank``, ``unmerge_low_rank`` and ``export_plain_model`` apply
    to them unchanged. The BatchNorm policy ``bn`` (``"train"``, ``"frozen"``, ``"adabn"``) is set with
    :meth:`~cvft.strategies.Strategy.with_bn` or a ``bn`` key in a recipe.

    Args:
        rank: Rank ``r`` of the update.
        alpha: Scale numerator: updates are multiplied by ``alpha / rank``.
        dropout: Dropout probability on the input of the update path.
        targets: A named selector (``"auto"``, ``"pointwise"``, ``"attention"``, ``"mlp"``, ``"block_convs"``,
            ``"spatial"``, ``"all_linear"``, ``"all_conv"``; see :mod:`cvft.strategies.selectors`), a legacy preset
            (``"vit_attention"``, ``"vit_mlp"``, ``"vit_all"``, ``"resnet_blocks"``, ``"convnext_blocks"``), a type
            name (``"Linear"``, ``"Conv2d"``), module names or regexes, or a list (see
            :mod:`cvft.strategies.lowrank.targets`).
        train_head: Also train the classifier head.
        train_bias: Also train the biases of the adapted layers.
    """

    name = "low_rank"

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        targets: str | list[str] = "auto",
        train_head: bool = True,
        train_bias: bool = False,
    ) -> None:
        check_low_rank_hyperparameters(self.name, rank, alpha, dropout)
        targets = check_targets(self.name, targets)
        self.rank = rank
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.targets = targets
        self.train_head = bool(train_head)
        self.train_bias = bool(train_bias)

    def layer_options(self) -> dict[str, Any]:
        """The family's wrapper arguments as this strategy holds them: ``rank``, ``alpha``, ``dropout``."""
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout}

    def make_layer(self, base: nn.Module) -> LowRankLayer:
        """The wrapper of one target layer (e.g. ``SomeLayer(base, **self.layer_options())``)."""
        raise NotImplementedError

    def layer_factory(self, model: nn.Module) -> LayerFactory:
        """What builds the wrappers of ``model``'s targets (called once per injection): :meth:`make_layer`."""
        return self.make_layer

    def find_targets(self, model: nn.Module) -> list[str]:
        """Names of the layers :attr:`targets` selects in ``model``."""
        return find_low_rank_targets(model, self.targets, self.name)

    def prepare_targets(self, model: nn.Module, names: list[str]) -> None:
        """Change the target layers before they are wrapped (nothing by default)."""

    def inject(self, model: nn.Module) -> list[str]:
        """Find the targets, prepare them and wrap each one; return the wrapped layers' names."""
        names = self.find_targets(model)
        self.prepare_targets(model, names)
        return wrap_layers(model, names, self.layer_factory(model))

    def setup(self, model: nn.Module) -> None:
        """Freeze the model, wrap the targets and make their updates (and the head) trainable."""
        head = require_head(model, self.name, self.train_head)
        names = self.inject(model)
        trainable = set(head) | low_rank_parameter_names(model)
        if self.train_bias:
            trainable |= {f"{name}.base.bias" for name in names if model.get_submodule(name).base.bias is not None}
        set_trainable(model, trainable)
        self.apply_bn_policy(model)
