"""The ``qlora`` strategy: LoRA on top of base Linear and Conv2d weights frozen in 4-bit NF4."""

from __future__ import annotations

from typing import Any

from torch import nn

from cvft.errors import StrategyError
from cvft.strategies._modules import set_submodule
from cvft.strategies.lora.strategy import LoRA
from cvft.strategies.lowrank.targets import find_low_rank_targets
from cvft.strategies.qlora.nf4 import NF4Linear
from cvft.strategies.qlora.nf4_conv import QUANTIZE_DEPTHWISE, NF4Conv2d, is_depthwise
from cvft.strategies.registry import register_strategy

__all__ = ["QLoRA", "quantize_layers", "quantize_linear_layers"]


def quantize_layers(
    model: nn.Module,
    names: list[str],
    block_size: int = 64,
    scaler_block_size: int = 256,
    quantize_depthwise: bool = QUANTIZE_DEPTHWISE,
) -> list[str]:
    """Replace the named ``nn.Linear`` / ``nn.Conv2d`` layers of ``model`` by NF4 ones, in place.

    Depthwise convolutions stay dense unless ``quantize_depthwise`` (see :mod:`cvft.strategies.qlora.nf4_conv`).
    Returns the names of the layers now held in NF4.

    Raises:
        StrategyError: A named layer is neither a Linear nor a Conv2d layer; the message names it.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_resnet", num_classes=3)
        >>> quantize_layers(model, ["layer1.0.conv1"])
        ['layer1.0.conv1']
        >>> type(model.layer1[0].conv1).__name__
        'NF4Conv2d'
    """
    quantized = []
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, (NF4Linear, NF4Conv2d)):
            quantized.append(name)
        elif isinstance(layer, nn.Linear):
            set_submodule(model, name, NF4Linear(layer, block_size, scaler_block_size))
            quantized.append(name)
        elif isinstance(layer, nn.Conv2d):
            if is_depthwise(layer) and not quantize_depthwise:
                continue
            set_submodule(model, name, NF4Conv2d(layer, block_size, scaler_block_size))
            quantized.append(name)
        else:
            raise StrategyError(
                f"qlora quantises Linear and Conv2d layers, but target {name!r} is a {type(layer).__name__}; "
                "leave it out of `targets` (e.g. use 'auto', 'vit_all' or 'block_convs')."
            )
    return quantized


#: Former name (Linear layers only), kept for compatibility.
quantize_linear_layers = quantize_layers


@register_strategy
class QLoRA(LoRA):
    """QLoRA (Dettmers et al., 2023): the frozen base weights go to 4-bit NF4, LoRA trains on top.

    Linear layers and convolutions are quantised alike (:class:`~cvft.strategies.qlora.NF4Linear`,
    :class:`~cvft.strategies.qlora.NF4Conv2d`), so QLoRA runs on ViTs, ResNets, EfficientNets and ConvNeXts.
    Everything else is :class:`~cvft.strategies.lora.LoRA`: the other arguments (ranks, qkv parts), merge (into a
    dense, dequantised layer; unmerge restores the NF4 one) and export. NF4 block scales are always double-quantised
    (torchao's NF4 tensor); the bias, the head and normalisation layers stay in full precision.

    Args:
        targets: Layers to quantise and adapt. Default (``None``): every Linear layer of a transformer's blocks
            (``"vit_all"``, the paper's choice), and ``"auto"`` on models without them (CNNs: the pointwise convs
            of depthwise-separable blocks, else the block convs). Targeted depthwise convs are adapted but stay dense
            unless ``quantize_depthwise``.
        block_size: Values per NF4 absmax block (even). A weight whose size is not a multiple is zero-padded up to
            the next whole block.
        scaler_block_size: Blocks per second-level scale block.
        quantize_depthwise: Also store depthwise convolutions in NF4 (they are a tiny share of the weights).
        kwargs: :class:`~cvft.strategies.lora.LoRA`'s other arguments (``qkv_parts``, ``use_rslora`` and the
            low-rank family's ``rank``, ``alpha``, ``dropout``, ``train_head``, ``train_bias``).

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit", num_classes=3)
        >>> QLoRA(rank=2).setup(model)
        >>> type(model.blocks[0].attn.qkv.base).__name__
        'NF4Linear'
        >>> cnn = timm.create_model("test_resnet", num_classes=3)
        >>> QLoRA(rank=2).setup(cnn)
        >>> type(cnn.layer1[0].conv1.base).__name__
        'NF4Conv2d'
    """

    name = "qlora"

    def __init__(
        self,
        *,
        targets: str | list[str] | None = None,
        block_size: int = 64,
        scaler_block_size: int = 256,
        quantize_depthwise: bool = QUANTIZE_DEPTHWISE,
        **kwargs: Any,
    ) -> None:
        super().__init__(targets="auto" if targets is None else targets, **kwargs)
        if targets is None:
            self.targets = None
        if block_size < 2 or block_size % 2 or scaler_block_size < 1:
            raise StrategyError(
                f"qlora: block_size must be an even number >= 2 (NF4 packs two codes per byte) and "
                f"scaler_block_size >= 1, got {block_size} and {scaler_block_size}."
            )
        self.block_size = block_size
        self.scaler_block_size = scaler_block_size
        self.quantize_depthwise = bool(quantize_depthwise)

    def find_targets(self, model: nn.Module) -> list[str]:
        """The layers :attr:`targets` selects; by default ``"vit_all"``, or ``"auto"`` where that matches nothing."""
        if self.targets is not None:
            return super().find_targets(model)
        try:
            return find_low_rank_targets(model, "vit_all", self.name)
        except StrategyError:
            return find_low_rank_targets(model, "auto", self.name)

    def prepare_targets(self, model: nn.Module, names: list[str]) -> None:
        """Quantise the target layers to NF4 before LoRA wraps them."""
        quantize_layers(model, names, self.block_size, self.scaler_block_size, self.quantize_depthwise)
