"""The ``qlora`` strategy: LoRA on top of base Linear weights frozen in 4-bit NF4."""

from __future__ import annotations

from torch import nn

from cvft.errors import StrategyError
from cvft.strategies._modules import set_submodule
from cvft.strategies.lora.strategy import LoRA
from cvft.strategies.qlora.nf4 import NF4Linear
from cvft.strategies.registry import register_strategy

__all__ = ["QLoRA", "quantize_linear_layers"]


def quantize_linear_layers(
    model: nn.Module, names: list[str], block_size: int = 64, scaler_block_size: int = 256
) -> None:
    """Replace the named ``nn.Linear`` layers of ``model`` by :class:`NF4Linear`, in place."""
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            raise StrategyError(
                f"qlora quantises Linear layers, but target {name!r} is a {type(layer).__name__}; "
                "use `lora` for convolutions or restrict `targets` to Linear layers (e.g. 'vit_all')."
            )
        if not isinstance(layer, NF4Linear):
            set_submodule(model, name, NF4Linear(layer, block_size, scaler_block_size))


@register_strategy
class QLoRA(LoRA):
    """QLoRA (Dettmers et al., 2023): the frozen base Linear weights go to 4-bit NF4, LoRA trains on top.

    Everything else is :class:`~cvft.strategies.lora.LoRA`: the other arguments (targets, ranks, qkv parts), merge
    (into a dense, dequantised layer; unmerge restores the NF4 one) and export. NF4 block scales are always
    double-quantised (torchao's NF4 tensor); the bias, the head and normalisation layers stay in full precision.

    Args:
        targets: Linear layers to quantise and adapt (default: all Linear layers of a ViT's blocks).
        block_size: Values per NF4 absmax block.
        scaler_block_size: Blocks per second-level scale block.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit", num_classes=3)
        >>> QLoRA(rank=2).setup(model)
        >>> type(model.blocks[0].attn.qkv.base).__name__
        'NF4Linear'
    """

    name = "qlora"

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        targets: str | list[str] = "vit_all",
        qkv_parts: list[str] | None = None,
        use_rslora: bool = False,
        train_head: bool = True,
        train_bias: bool = False,
        block_size: int = 64,
        scaler_block_size: int = 256,
    ) -> None:
        super().__init__(rank, alpha, dropout, targets, qkv_parts, use_rslora, train_head, train_bias)
        if block_size < 2 or scaler_block_size < 1:
            raise StrategyError(f"qlora: block sizes must be positive, got {block_size}, {scaler_block_size}.")
        self.block_size = block_size
        self.scaler_block_size = scaler_block_size

    def prepare_targets(self, model: nn.Module, names: list[str]) -> None:
        """Quantise the target Linear layers to NF4 before LoRA wraps them."""
        quantize_linear_layers(model, names, self.block_size, self.scaler_block_size)
