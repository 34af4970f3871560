"""Attention rollout (Abnar & Zuidema 2020) for timm vision transformers.

Each layer's attention (heads fused by mean, max or min) is mixed with the residual connection, ``(A + I) / 2``,
re-normalised so rows sum to 1, and the layers are multiplied in order: ``R = A_L ... A_1``. The class token's row
of ``R`` over the patch tokens is the map (models without a class token use the mean of the patch rows).

timm computes attention with fused ``scaled_dot_product_attention``, which never materialises the probabilities:
:func:`attention_maps` switches the attention modules to their explicit path for one forward pass (``fused_attn =
False``) and reads the softmax output where it enters ``attn_drop``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from cvft.errors import CvftError
from cvft.medical.explain.gradcam import normalise_maps, patch_grid, timm_model

__all__ = ["HEAD_FUSIONS", "attention_maps", "attention_rollout", "rollout"]

HEAD_FUSIONS: tuple[str, ...] = ("mean", "max", "min")
"""How the heads of one layer are combined."""


def attention_maps(model: nn.Module, images: Tensor) -> list[Tensor]:
    """Attention probabilities ``(B, heads, N, N)`` of every attention layer, in forward order (eval, no grad).

    Example:
        >>> import timm
        >>> maps = attention_maps(timm.create_model("test_vit", pretrained=False), torch.randn(1, 3, 32, 32))
        >>> len(maps), maps[0].shape
        (6, torch.Size([1, 2, 5, 5]))
    """
    net = timm_model(model)
    modules = [
        m for m in net.modules() if hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None), nn.Module)
    ]
    if not modules:
        raise CvftError(
            f"{type(net).__name__} has no timm attention modules (with fused_attn and attn_drop), so attention "
            "rollout cannot read its attention; use method='gradcam'."
        )
    captured: list[Tensor] = []

    def keep(_module: nn.Module, inputs: Any) -> None:
        captured.append(inputs[0].detach().float())

    fused = [m.fused_attn for m in modules]
    handles = [m.attn_drop.register_forward_pre_hook(keep) for m in modules]
    was_training = model.training
    model.eval()
    try:
        for module in modules:
            module.fused_attn = False
        with torch.no_grad():
            model(images)
    finally:
        for module, flag in zip(modules, fused, strict=True):
            module.fused_attn = flag
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if len(captured) != len(modules):
        raise CvftError(
            f"Captured {len(captured)} attention maps from {len(modules)} attention modules: this model's attention "
            "does not pass its probabilities through attn_drop; use method='gradcam'."
        )
    return captured


def rollout(
    attentions: Sequence[Tensor], discard_ratio: float = 0.0, head_fusion: Literal["mean", "max", "min"] = "mean"
) -> Tensor:
    """Roll attention out through the layers: ``(B, N, N)`` token-to-token attribution.

    Args:
        attentions: Per layer ``(B, heads, N, N)`` attention probabilities (rows sum to 1).
        discard_ratio: Fraction of the lowest fused attention weights set to zero in every layer (the class token's
            attention to itself is kept), as in Gildenblat's popular implementation; 0 keeps everything.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.

    Example:
        >>> uniform = torch.full((1, 2, 3, 3), 1 / 3)
        >>> rollout([uniform, uniform])[0, 0]
        tensor([0.5000, 0.2500, 0.2500])
    """
    if head_fusion not in HEAD_FUSIONS:
        raise CvftError(f"Unknown head_fusion {head_fusion!r}; choose one of {', '.join(HEAD_FUSIONS)}.")
    if not 0.0 <= discard_ratio < 1.0:
        raise CvftError(f"discard_ratio must be in [0, 1), got {discard_ratio}.")
    if not attentions:
        raise CvftError("rollout needs at least one attention map.")
    batch, tokens = attentions[0].shape[0], attentions[0].shape[-1]
    identity = torch.eye(tokens, device=attentions[0].device)
    result = identity.expand(batch, tokens, tokens).clone()
    for attention in attentions:
        fused = {"mean": attention.mean(1), "max": attention.amax(1), "min": attention.amin(1)}[head_fusion].float()
        if discard_ratio > 0:
            flat = fused.reshape(batch, -1).clone()
            lowest = flat.topk(int(flat.shape[1] * discard_ratio), dim=1, largest=False).indices
            keep_first = flat[:, :1].clone()
            flat.scatter_(1, lowest, 0.0)
            flat[:, :1] = keep_first
            fused = flat.reshape(batch, tokens, tokens)
        mixed = (fused + identity) / 2
        mixed = mixed / mixed.sum(-1, keepdim=True)
        result = mixed @ result
    return result


def attention_rollout(
    model: nn.Module,
    images: Tensor,
    discard_ratio: float = 0.0,
    head_fusion: Literal["mean", "max", "min"] = "mean",
) -> Tensor:
    """Attention-rollout maps of a timm ViT, upsampled to the input (bilinear) and normalised to ``[0, 1]``.

    Args:
        model: An :class:`~cvft.tasks.ImageClassifier` on a timm ViT, or the timm ViT.
        images: Normalised input batch ``(B, C, H, W)``.
        discard_ratio: See :func:`rollout`.
        head_fusion: See :func:`rollout`.

    Returns:
        ``(B, H, W)`` maps in ``[0, 1]``.

    Example:
        >>> import timm
        >>> vit = timm.create_model("test_vit", pretrained=False)
        >>> attention_rollout(vit, torch.randn(2, 3, 32, 48)).shape
        torch.Size([2, 32, 48])
    """
    net = timm_model(model)
    rolled = rollout(attention_maps(model, images), discard_ratio, head_fusion)
    prefix = int(getattr(net, "num_prefix_tokens", 0))
    rows = rolled[:, 0, prefix:] if prefix else rolled.mean(1)
    height, width = patch_grid(net, images.shape[-2:], rows.shape[1])
    grid = rows.reshape(len(rows), 1, height, width)
    return normalise_maps(nn.functional.interpolate(grid, size=images.shape[-2:], mode="bilinear", align_corners=False))
