"""The ``lora`` strategy and the helpers that merge, unmerge and export LoRA models."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from cvft.errors import StrategyError
from cvft.strategies._freeze import require_head, set_trainable
from cvft.strategies._modules import set_submodule
from cvft.strategies.base import Strategy
from cvft.strategies.lora.layer import QKV_PARTS, LoRAConv2d, LoRALayer, LoRALinear, check_adapter_hyperparameters
from cvft.strategies.lora.targets import find_targets
from cvft.strategies.registry import register_strategy

__all__ = [
    "AdapterStrategy",
    "LoRA",
    "inject_adapters",
    "inject_lora",
    "lora_layers",
    "lora_parameter_names",
    "merge_lora",
    "unmerge_lora",
    "export_plain_model",
]


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every LoRA wrapper in ``model``, by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALayer)}


def lora_parameter_names(model: nn.Module) -> set[str]:
    """Names (in ``model.named_parameters()``) of all LoRA update parameters, base weights excluded."""
    return {f"{name}.{p}" for name, layer in lora_layers(model).items() for p, _ in layer.lora_parameters()}


def inject_adapters(
    model: nn.Module, targets: str | list[str], make_layer: Callable[[nn.Module], LoRALayer]
) -> list[str]:
    """Replace the target layers of ``model`` (see :func:`~cvft.strategies.lora.find_targets`) in place.

    ``make_layer`` builds the wrapper of one base layer; it is moved to the base weight's device and dtype.
    Returns the names of the replaced layers.
    """
    names = find_targets(model, targets)
    for name in names:
        base = model.get_submodule(name)
        wrapper = make_layer(base)
        set_submodule(model, name, wrapper.to(device=base.weight.device, dtype=base.weight.dtype))
    return names


class AdapterStrategy(Strategy):
    """Common part of the low-rank strategies (LoRA, LoHA, LoKr): validated arguments and ``setup``.

    ``setup`` freezes the model, wraps the targets and trains the updates (and the head).

    Subclasses set ``name`` and implement :meth:`make_layer`.

    Args:
        rank: Rank of the low-rank factors.
        alpha: Scale numerator: updates are multiplied by ``alpha / rank``.
        dropout: Dropout probability on the input of the update path.
        targets: A preset, a type name, module names or regexes, or a list (as for ``lora``).
        train_head: Also train the classifier head.
        train_bias: Also train the biases of the adapted layers.
    """

    name = "adapter"
    takes_bn = True
    default_bn = "frozen"  # not yet measured: the long-standing behaviour

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        targets: str | list[str] = "auto",
        train_head: bool = True,
        train_bias: bool = False,
    ) -> None:
        check_adapter_hyperparameters(self.name, rank, alpha, dropout)
        if isinstance(targets, str):
            targets_value: str | list[str] = targets
        else:
            targets_value = list(targets)
            if not targets_value:
                raise StrategyError(f"{self.name}: `targets` is empty; give a preset such as 'auto' or module names.")
        self.rank = rank
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.targets = targets_value
        self.train_head = bool(train_head)
        self.train_bias = bool(train_bias)

    def make_layer(self, base: nn.Module) -> LoRALayer:
        """The wrapper of one target layer."""
        raise NotImplementedError

    def inject(self, model: nn.Module) -> list[str]:
        """Wrap every target layer with :meth:`make_layer`; return the wrapped layers' names."""
        return inject_adapters(model, self.targets, self.make_layer)

    def setup(self, model: nn.Module) -> None:
        """Freeze the model, wrap the targets and make their updates (and the head) trainable."""
        head = require_head(model, self.name, self.train_head)
        names = self.inject(model)
        trainable = set(head) | lora_parameter_names(model)
        if self.train_bias:
            trainable |= {f"{name}.base.bias" for name in names if model.get_submodule(name).base.bias is not None}
        set_trainable(model, trainable)
        self.apply_bn_policy(model)


def inject_lora(
    model: nn.Module,
    targets: str | Sequence[str] = "auto",
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    use_rslora: bool = False,
    qkv_parts: Sequence[str] | None = None,
) -> list[str]:
    """Replace the target layers of ``model`` by LoRA wrappers in place; return their names.

    ``qkv_parts`` applies to targeted Linear layers named ``...qkv`` (timm's fused attention projection).

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit")
        >>> inject_lora(model, "vit_attention", rank=2, qkv_parts=["q", "v"])[:2]
        ['blocks.0.attn.qkv', 'blocks.0.attn.proj']
        >>> model.blocks[0].attn.qkv.split
        ('q', 'v')
    """

    def make_layer(base: nn.Module) -> LoRALayer:
        if isinstance(base, nn.Linear):
            split = qkv_parts if id(base) in fused_qkv else None
            return LoRALinear(base, rank, alpha, dropout, use_rslora, split=split)
        return LoRAConv2d(base, rank, alpha, dropout, use_rslora)

    fused_qkv = {id(m) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "qkv"}
    return inject_adapters(model, targets, make_layer)


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight (inference without extra cost); already merged layers stay."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take every LoRA update out of its base weight again."""
    for layer in lora_layers(model).values():
        layer.unmerge()


def export_plain_model(model: nn.Module) -> nn.Module:
    """Merge the updates and put the base layers back, in place; the result has exactly the original keys.

    The returned model (``model`` itself) loads into a freshly created timm model with ``strict=True``.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_resnet", num_classes=3)
        >>> keys = list(model.state_dict())
        >>> LoRA(rank=2).setup(model)
        >>> list(export_plain_model(model).state_dict()) == keys
        True
    """
    merge_lora(model)
    for name, layer in lora_layers(model).items():
        set_submodule(model, name, layer.base)
    return model


@register_strategy
class LoRA(AdapterStrategy):
    """Low-rank adaptation: freeze the backbone and learn ``W + (alpha / r) * B @ A`` for chosen layers.

    Linear layers (attention, MLP) and Conv2d layers (grouped and depthwise included) can be adapted; see
    :mod:`cvft.strategies.lora.targets` for the presets. Put freezing strategies *before* ``lora`` and
    ``gradual_unfreeze`` *after* it: gradual unfreezing then schedules only LoRA and head parameters.

    Args:
        rank: Rank ``r`` of every update.
        alpha: Scale numerator: updates are multiplied by ``alpha / rank``.
        dropout: Dropout probability on the input of the update path.
        targets: A named selector (``"auto"``, ``"pointwise"``, ``"attention"``, ``"mlp"``, ``"block_convs"``,
            ``"spatial"``, ``"all_linear"``, ``"all_conv"``; see :mod:`cvft.strategies.selectors`), a legacy preset
            (``"vit_attention"``, ``"vit_mlp"``, ``"vit_all"``, ``"resnet_blocks"``, ``"convnext_blocks"``), a type
            name (``"Linear"``, ``"Conv2d"``), module names or regexes, or a list. The BatchNorm policy ``bn``
            (``"train"``, ``"frozen"``, ``"adabn"``) is set with :meth:`~cvft.strategies.Strategy.with_bn` or a
            ``bn`` key in a recipe.
        qkv_parts: Adapt only these thirds (``"q"``, ``"k"``, ``"v"``) of fused ``qkv`` projections, e.g.
            ``["q", "v"]`` as in the LoRA paper; ``None`` adapts all three.
        use_rslora: Scale by ``alpha / sqrt(rank)`` (rank-stabilised LoRA) instead of ``alpha / rank``.
        train_head: Also train the classifier head.
        train_bias: Also train the biases of the adapted layers.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit", num_classes=3)
        >>> LoRA(rank=2, targets="vit_attention", qkv_parts=["q", "v"]).setup(model)
        >>> sorted(n for n, p in model.named_parameters() if p.requires_grad)[:3]
        ['blocks.0.attn.proj.lora_A.weight', 'blocks.0.attn.proj.lora_B.weight', 'blocks.0.attn.qkv.lora_A.q.weight']
    """

    name = "lora"
    default_lr = 3e-3
    # Measured (README, "Strategy defaults"): with BatchNorm frozen, LoRA on EfficientNet-Lite0's pointwise convs
    # collapsed to the majority class on BreastMNIST in 1 of 6 seeds at 96 px and 2 of 3 at 64 px (ReLU6 units
    # saturate once the adapted convs shift their inputs and the frozen statistics no longer re-centre them); with
    # statistics re-estimated ("train", what a PEFT loop in train mode does) no seed collapsed.
    default_bn = "train"

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        targets: str | list[str] = "auto",
        qkv_parts: list[str] | None = None,
        use_rslora: bool = False,
        train_head: bool = True,
        train_bias: bool = False,
    ) -> None:
        super().__init__(rank, alpha, dropout, targets, train_head, train_bias)
        if qkv_parts is not None:
            qkv_parts = list(qkv_parts)
            if not qkv_parts or any(p not in QKV_PARTS for p in qkv_parts) or len(set(qkv_parts)) != len(qkv_parts):
                raise StrategyError(
                    f"lora: qkv_parts must be a non-empty subset of {list(QKV_PARTS)} without repeats, got {qkv_parts}."
                )
        self.qkv_parts = qkv_parts
        self.use_rslora = bool(use_rslora)

    def inject(self, model: nn.Module) -> list[str]:
        """Wrap the targets in LoRA layers (fused ``qkv`` projections get ``qkv_parts``)."""
        return inject_lora(
            model, self.targets, self.rank, self.alpha, self.dropout, self.use_rslora, qkv_parts=self.qkv_parts
        )
