"""What the bottleneck-adapter strategies share: validated arguments and the freeze-and-train step of ``setup``."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from cvft.errors import StrategyError
from cvft.strategies._freeze import require_head, set_trainable
from cvft.strategies.adapters.layer import AdapterWrapper, adapter_parameter_names, make_activation, set_submodule
from cvft.strategies.adapters.targets import transformer_blocks
from cvft.strategies.base import ParameterStrategy

__all__ = ["BottleneckAdapterStrategy", "POSITIONS", "check_positions", "check_positive_int", "linear_dims"]

#: Sub-layers of a transformer block that can get an adapter.
POSITIONS = ("attn", "mlp")


def check_positive_int(method: str, name: str, value: object, optional: bool = False) -> None:
    """Refuse anything but a positive integer (or ``None`` when ``optional``), naming ``method`` and ``name``.

    Example:
        >>> check_positive_int("conv_adapter", "reduction", 0)
        Traceback (most recent call last):
        ...
        cvft.errors.StrategyError: conv_adapter: reduction must be a positive integer, got 0.
    """
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise StrategyError(f"{method}: {name} must be a positive integer, got {value!r}.")


def linear_dims(method: str, name: str, module: nn.Module) -> tuple[int, int]:
    """``(in, out)`` features of a token sub-layer: the first Linear's input and the last Linear's output.

    Example:
        >>> import timm
        >>> block = timm.create_model("test_vit").blocks[0]
        >>> linear_dims("vit_adapter", "blocks.0.mlp", block.mlp)
        (64, 64)
    """
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise StrategyError(
            f"{method}: {name} ({type(module).__name__}) has no nn.Linear layer to read its feature size from."
        )
    return linears[0].in_features, linears[-1].out_features


def check_positions(method: str, positions: Sequence[str] | None) -> list[str] | None:
    """Validate ``positions`` (a non-empty subset of :data:`POSITIONS`); return it as a list.

    Example:
        >>> check_positions("vit_adapter", "mlp")
        ['mlp']
    """
    if positions is None:
        return None
    chosen = [positions] if isinstance(positions, str) else list(positions)
    if not chosen or any(p not in POSITIONS for p in chosen) or len(set(chosen)) != len(chosen):
        raise StrategyError(
            f"{method}: positions must be a non-empty subset of {list(POSITIONS)} without repeats, got {chosen}."
        )
    return chosen


class BottleneckAdapterStrategy(ParameterStrategy):
    """Common part of ``conv_adapter``, ``vit_adapter`` and ``shared_adapter``.

    ``setup`` injects the wrappers (:meth:`inject`), then makes exactly the adapters' parameters, their scales and
    (with ``train_head``) the classifier head trainable; frozen BatchNorm layers keep their statistics. Adapters are
    non-linear, so they cannot be merged into the frozen weights.

    Args:
        reduction: Bottleneck width is ``channels // reduction`` (at least 1).
        width: Fixed bottleneck width; overrides ``reduction``.
        act: timm activation name inside the bottleneck.
        train_head: Also train the classifier head.

    Example:
        >>> class Nothing(BottleneckAdapterStrategy):
        ...     name = "nothing_example"
        ...     def inject(self, model):
        ...         return []
        >>> import timm
        >>> model = timm.create_model("test_resnet", num_classes=3)
        >>> Nothing().setup(model)
        >>> sorted(n for n, p in model.named_parameters() if p.requires_grad)
        ['fc.bias', 'fc.weight']
    """

    name = "bottleneck_adapter"

    def __init__(self, reduction: int = 4, width: int | None = None, act: str = "relu", train_head: bool = True):
        check_positive_int(self.name, "reduction", reduction)
        check_positive_int(self.name, "width", width, optional=True)
        try:
            make_activation(act)
        except StrategyError as err:
            raise StrategyError(f"{self.name}: {err}") from None
        self.reduction = reduction
        self.width = width
        self.act = act
        self.train_head = bool(train_head)

    def inject(self, model: nn.Module) -> list[str]:
        """Wrap the chosen modules of ``model``; return the wrappers' names."""
        raise NotImplementedError

    def refuse_vit(self, model: nn.Module) -> None:
        """Raise for ViT-family models: convolutional adapters need NCHW blocks."""
        if transformer_blocks(model):
            raise StrategyError(
                f"{self.name} supports CNNs (timm ResNet, ConvNeXt, EfficientNet/MobileNet, RegNet ...), but "
                f"{type(model).__name__} is a ViT-family model (transformer blocks with attn and mlp). "
                "For ViTs use vit_adapter (or shared_adapter)."
            )

    def vit_blocks(self, model: nn.Module) -> dict[str, nn.Module]:
        """Transformer blocks of ``model``; raise, naming the supported families, when it has none."""
        blocks = transformer_blocks(model)
        if not blocks:
            raise StrategyError(
                f"{self.name} supports ViT-family models (timm blocks with attn and mlp sub-layers), but "
                f"{type(model).__name__} has none. For CNNs use conv_adapter."
            )
        return blocks

    @staticmethod
    def wrap(model: nn.Module, name: str, wrapper: AdapterWrapper) -> None:
        """Put ``wrapper`` in place of sub-module ``name``, on the base's device and dtype."""
        like = next(wrapper.base.parameters(), None)
        if like is not None:
            wrapper.adapter.to(device=like.device, dtype=like.dtype)
        set_submodule(model, name, wrapper)

    def setup(self, model: nn.Module) -> None:
        """Inject the adapters, then train them (and the head) only."""
        head = require_head(model, self.name, self.train_head)
        self.inject(model)
        set_trainable(model, set(head) | adapter_parameter_names(model))
        self.apply_bn_policy(model)
