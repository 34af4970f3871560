"""The ``shared_lora`` strategy: LoRA targets, one trainable low-rank pair per weight shape, a scale per layer."""

from __future__ import annotations

from typing import Any

from torch import nn

from cvft.strategies.lowrank import LayerFactory, LowRankStrategy, inject_low_rank
from cvft.strategies.registry import register_strategy
from cvft.strategies.shared_lora.layer import SharedLoRALayer, SharedLowRankPair

__all__ = ["SharedLoRA", "inject_shared_lora", "shared_layer_factory", "shared_pairs"]


def shared_pairs(model: nn.Module) -> dict[str, SharedLowRankPair]:
    """Every distinct shared pair of ``model``, under the module name it is first reached by.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit")
        >>> _ = inject_shared_lora(model, "vit_attention", rank=2)
        >>> list(shared_pairs(model))
        ['blocks.0.attn.qkv.shared', 'blocks.0.attn.proj.shared']
    """
    return {name: m for name, m in model.named_modules() if isinstance(m, SharedLowRankPair)}


def shared_layer_factory(rank: int = 8, alpha: float = 16, dropout: float = 0.0) -> LayerFactory:
    """What builds the wrappers of one injection: layers whose weights have the same shape share one pair."""
    pairs: dict[tuple[int, ...], SharedLowRankPair] = {}

    def make_layer(base: nn.Module) -> SharedLoRALayer:
        weight = base.weight
        key = tuple(weight.shape)
        if key not in pairs:
            pairs[key] = SharedLowRankPair(
                weight.shape[0], weight[0].numel(), rank, device=weight.device, dtype=weight.dtype
            )
        return SharedLoRALayer(base, pairs[key], alpha, dropout)

    return make_layer


def inject_shared_lora(model: nn.Module, targets: str | list[str] = "auto", **options: Any) -> list[str]:
    """Wrap the target layers of ``model`` (see :func:`~cvft.strategies.lowrank.find_low_rank_targets`), by shape.

    Layers whose weights have the same shape (a Linear's ``(out, in)``, a conv's ``(out, in / groups, kh, kw)``)
    share one :class:`SharedLowRankPair`. ``options`` are :func:`shared_layer_factory`'s (the family's ``rank``,
    ``alpha``, ``dropout``). Returns the wrapped layers' names.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit")
        >>> len(inject_shared_lora(model, "vit_mlp", rank=2))  # fc1 and fc2 of 6 blocks
        12
        >>> model.blocks[0].mlp.fc1.shared is model.blocks[5].mlp.fc1.shared
        True
    """
    return inject_low_rank(model, targets, shared_layer_factory(**options))


@register_strategy
class SharedLoRA(LowRankStrategy):
    """LoRA with the low-rank pair ``(A, B)`` shared by all adapted layers of one weight shape (Tied-LoRA style).

    Layer ``l`` learns ``W_l + (alpha / r) * s_l * B @ A`` with ``(A, B)`` shared by its shape group and a scalar
    ``s_l`` of its own: ``r * (in + out)`` parameters per shape group plus one per layer. Targets are chosen as for
    ``lora``; the arguments not listed below, and merging and export, are the low-rank family's
    (:class:`~cvft.strategies.lowrank.LowRankStrategy`).

    Args:
        rank: Rank ``r`` of the shared pairs.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit", num_classes=3)
        >>> SharedLoRA(rank=2, targets="vit_attention", train_head=False).setup(model)
        >>> sorted(n for n, p in model.named_parameters() if p.requires_grad and "shared" in n)
        ['blocks.0.attn.proj.shared.lora_A', 'blocks.0.attn.proj.shared.lora_B', 'blocks.0.attn.qkv.shared.lora_A', \
'blocks.0.attn.qkv.shared.lora_B']
    """

    name = "shared_lora"

    def layer_factory(self, model: nn.Module) -> LayerFactory:
        """Wrappers sharing one pair per weight shape."""
        return shared_layer_factory(**self.layer_options())
