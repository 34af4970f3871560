"""Machinery shared by the weight-delta adapters (LoHA, LoKr) that reuse LoRA's wrapper, targets and export.

A :class:`DeltaWeightLayer` is a :class:`~cvft.strategies.lora.LoRALayer`, so ``merge_lora``, ``unmerge_lora``,
``export_plain_model``, ``lora_layers`` and adapter files treat it exactly like a LoRA layer. Subclasses only build
their factors and define :meth:`~DeltaWeightLayer.delta_matrix`: the unscaled update as an ``(out, in_flat)`` matrix,
where ``in_flat`` is ``in / groups * kh * kw`` for a convolution. The update is applied to inputs through the full
delta weight (``F.linear`` or the base convolution with the delta as weight), which supports grouped and depthwise
convolutions because the delta has the base weight's shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from cvft.backbones.layer_groups import head_parameter_names
from cvft.errors import StrategyError
from cvft.strategies._freeze import set_trainable, sync_batchnorm_stats
from cvft.strategies.base import Strategy
from cvft.strategies.lora.layer import LoRALayer
from cvft.strategies.lora.strategy import _set_submodule, lora_parameter_names
from cvft.strategies.lora.targets import find_targets

__all__ = ["DeltaWeightLayer", "AdapterStrategy", "check_adapter_hyperparameters", "inject_adapters"]


def check_adapter_hyperparameters(method: str, rank: int, alpha: float, dropout: float) -> None:
    """Refuse a non-positive or non-integer rank, ``alpha <= 0`` and dropout outside ``[0, 1)``, naming ``method``.

    Example:
        >>> check_adapter_hyperparameters("loha", 0, 1.0, 0.0)
        Traceback (most recent call last):
        ...
        cvft.errors.StrategyError: loha: rank must be a positive integer, got 0.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise StrategyError(f"{method}: rank must be a positive integer, got {rank!r}.")
    if not alpha > 0:
        raise StrategyError(f"{method}: alpha must be > 0, got {alpha!r}.")
    if not 0.0 <= dropout < 1.0:
        raise StrategyError(f"{method}: dropout must be in [0, 1), got {dropout!r}.")


class DeltaWeightLayer(LoRALayer):
    """A frozen ``nn.Linear`` or plain ``nn.Conv2d`` plus an update given as a full delta weight.

    Args:
        method: Name used in error messages (``"loha"``, ``"lokr"``).
        base: The layer to adapt; its parameters are frozen.
        rank: Rank of the low-rank factors.
        alpha: Scale numerator; the update is scaled by ``alpha / rank``.
        dropout: Dropout probability on the update's input.
    """

    def __init__(self, method: str, base: nn.Module, rank: int, alpha: float, dropout: float) -> None:
        check_adapter_hyperparameters(method, rank, alpha, dropout)
        if not (isinstance(base, nn.Linear) or type(base) is nn.Conv2d):
            raise StrategyError(
                f"{method}: can adapt nn.Linear and plain nn.Conv2d layers, got {type(base).__name__}; "
                "target a different module or leave this one out of `targets`."
            )
        super().__init__(base, rank, alpha, dropout, use_rslora=False)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(out, in_flat)``: the base weight seen as a matrix."""
        weight = self.base.weight
        return weight.shape[0], weight[0].numel()

    def delta_matrix(self) -> Tensor:
        """The unscaled update as an ``(out, in_flat)`` matrix."""
        raise NotImplementedError

    def delta_weight(self) -> Tensor:
        """The unscaled update in the shape of ``base.weight``."""
        return self.delta_matrix().reshape(self.base.weight.shape)

    def lora_forward(self, x: Tensor) -> Tensor:
        """The unscaled update applied to ``x``: a linear map or a convolution with the base's geometry."""
        delta = self.delta_weight()
        if isinstance(self.base, nn.Linear):
            return F.linear(x, delta)
        return self.base._conv_forward(x, delta, None)

    def extra_repr(self) -> str:
        """Hyper-parameters and merged state, for ``repr(model)``."""
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


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
        _set_submodule(model, name, wrapper.to(device=base.weight.device, dtype=base.weight.dtype))
    return names


class AdapterStrategy(Strategy):
    """Common ``setup`` of the weight-delta adapters: freeze, inject into the targets, train updates (and head).

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

    def setup(self, model: nn.Module) -> None:
        """Freeze the model, wrap the targets and make their updates (and the head) trainable."""
        head = head_parameter_names(model) if self.train_head else set()
        if self.train_head and not head:
            raise StrategyError(
                f"{self.name}: train_head=True needs a classifier head, but {type(model).__name__} has none "
                "(num_classes=0?). Create the backbone with num_classes > 0 or pass train_head=False."
            )
        names = inject_adapters(model, self.targets, self.make_layer)
        trainable = set(head) | lora_parameter_names(model)
        if self.train_bias:
            trainable |= {f"{name}.base.bias" for name in names if model.get_submodule(name).base.bias is not None}
        set_trainable(model, trainable)
        sync_batchnorm_stats(model, train_bn=False)
