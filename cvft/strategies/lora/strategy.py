"""The ``lora`` strategy, and the LoRA names of the low-rank family's helpers (kept for compatibility).

LoRA fills in the low-rank strategy's template (:class:`~cvft.strategies.lowrank.LowRankStrategy`) with one hook:
its :meth:`LoRA.layer_factory` gives fused ``qkv`` projections the chosen ``qkv_parts``. Merging, unmerging and
exporting are the family's (:mod:`cvft.strategies.lowrank.merge`): ``merge_lora`` is ``merge_low_rank`` and folds
every low-rank layer, LoRA's or not, as it always did.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from cvft.strategies.lora.layer import LoRAConv2d, LoRALinear, check_qkv_parts
from cvft.strategies.lowrank import (
    LayerFactory,
    LowRankLayer,
    LowRankStrategy,
    export_plain_model,
    inject_low_rank,
    low_rank_layers,
    low_rank_parameter_names,
    merge_low_rank,
    unmerge_low_rank,
)
from cvft.strategies.registry import register_strategy

__all__ = [
    "AdapterStrategy",
    "LoRA",
    "inject_adapters",
    "inject_lora",
    "lora_layer_factory",
    "lora_layers",
    "lora_parameter_names",
    "merge_lora",
    "unmerge_lora",
    "export_plain_model",
]

#: Former names of the low-rank family's helpers, kept for compatibility; they cover every low-rank method.
AdapterStrategy = LowRankStrategy
inject_adapters = inject_low_rank
lora_layers = low_rank_layers
lora_parameter_names = low_rank_parameter_names
merge_lora = merge_low_rank
unmerge_lora = unmerge_low_rank


def lora_layer_factory(model: nn.Module, *, qkv_parts: Sequence[str] | None = None, **options: Any) -> LayerFactory:
    """What builds ``model``'s LoRA wrappers.

    :class:`LoRAConv2d` for convolutions, :class:`LoRALinear` for Linear layers, with ``qkv_parts`` (their
    ``split``) on the fused ``...qkv`` projections (timm's attention). ``options`` go to every wrapper: the
    arguments the two wrappers share (``rank``, ``alpha``, ``dropout``, ``use_rslora``; see :class:`LoRALinear`).
    """
    fused_qkv = {id(m) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "qkv"}

    def make_layer(base: nn.Module) -> LowRankLayer:
        if isinstance(base, nn.Linear):
            split = qkv_parts if id(base) in fused_qkv else None
            return LoRALinear(base, split=split, **options)
        return LoRAConv2d(base, **options)

    return make_layer


def inject_lora(model: nn.Module, targets: str | Sequence[str] = "auto", **options: Any) -> list[str]:
    """Replace the target layers of ``model`` by LoRA wrappers in place; return their names.

    ``options`` are :func:`lora_layer_factory`'s: ``qkv_parts``, for targeted Linear layers named ``...qkv`` (timm's
    fused attention projection), and the wrappers' ``rank``, ``alpha``, ``dropout`` and ``use_rslora``.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit")
        >>> inject_lora(model, "vit_attention", rank=2, qkv_parts=["q", "v"])[:2]
        ['blocks.0.attn.qkv', 'blocks.0.attn.proj']
        >>> model.blocks[0].attn.qkv.split
        ('q', 'v')
    """
    return inject_low_rank(model, targets, lora_layer_factory(model, **options))


@register_strategy
class LoRA(LowRankStrategy):
    """Low-rank adaptation: freeze the backbone and learn ``W + (alpha / r) * B @ A`` for chosen layers.

    Linear layers (attention, MLP) and Conv2d layers (grouped and depthwise included) can be adapted; see
    :mod:`cvft.strategies.targets` for the presets. Put freezing strategies *before* ``lora`` and
    ``gradual_unfreeze`` *after* it: gradual unfreezing then schedules only LoRA and head parameters.
    The arguments not listed below are the low-rank family's (:class:`~cvft.strategies.lowrank.LowRankStrategy`).

    Args:
        qkv_parts: Adapt only these thirds (``"q"``, ``"k"``, ``"v"``) of fused ``qkv`` projections, e.g.
            ``["q", "v"]`` as in the LoRA paper; ``None`` adapts all three.
        use_rslora: Scale by ``alpha / sqrt(rank)`` (rank-stabilised LoRA) instead of ``alpha / rank``.
        kwargs: The low-rank family's arguments (``rank``, ``alpha``, ``dropout``, ``targets``, ``train_head``,
            ``train_bias``).

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

    def __init__(self, *, qkv_parts: list[str] | None = None, use_rslora: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if qkv_parts is not None:
            qkv_parts = list(qkv_parts)
            check_qkv_parts(qkv_parts)
        self.qkv_parts = qkv_parts
        self.use_rslora = bool(use_rslora)

    def layer_factory(self, model: nn.Module) -> LayerFactory:
        """LoRA wrappers; fused ``qkv`` projections get ``qkv_parts`` (see :func:`lora_layer_factory`)."""
        return lora_layer_factory(model, qkv_parts=self.qkv_parts, use_rslora=self.use_rslora, **self.layer_options())
