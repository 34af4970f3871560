"""Which timm models the prompt-based strategies accept, and the checks they share.

Prompt and prefix tokens join the attention of every block, so a model qualifies when its blocks attend over the
whole token sequence with absolute position embeddings added once before the first block: timm's
``VisionTransformer`` and its subclasses (``vit_*``, ``deit_*``, hybrid ``vit_*_r50_*``). Models whose attention
uses relative position tables, rotary embeddings or windows (Swin, BEiT, EVA) place tokens by their position in a
grid and are refused, as are CNNs.
"""

from __future__ import annotations

from torch import nn

from cvft.errors import StrategyError

__all__ = ["SUPPORTED", "require_vision_transformer"]

#: How the error messages name the supported family.
SUPPORTED = (
    "timm Vision Transformers (VisionTransformer and its subclasses: vit_*, deit_*) whose blocks attend over the "
    "full token sequence"
)
_REFUSED = (
    "Models with relative position tables, rotary embeddings or windowed attention (swin, beit, eva) and CNNs "
    "are not supported"
)


def require_vision_transformer(model: nn.Module, method: str) -> None:
    """Refuse anything but a timm ``VisionTransformer`` (subclasses included) with blocks and token norms.

    Args:
        model: The model to check.
        method: Strategy name, for the message.

    Raises:
        StrategyError: ``model`` is not of the supported family; the message names it.

    Example:
        >>> import timm
        >>> require_vision_transformer(timm.create_model("test_vit"), "vpt")
        >>> require_vision_transformer(timm.create_model("test_resnet"), "vpt")
        Traceback (most recent call last):
        ...
        cvft.errors.StrategyError: vpt supports timm Vision Transformers ... got ResNet. ...
    """
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise StrategyError(f"{method} supports {SUPPORTED}; got {type(model).__name__}. {_REFUSED}.")
    missing = [name for name in ("patch_embed", "norm_pre", "blocks", "norm") if not hasattr(model, name)]
    if missing or len(model.blocks) == 0:
        raise StrategyError(
            f"{method}: {type(model).__name__} lacks {', '.join(missing) or 'blocks'}, which {method} hooks into; "
            f"it supports {SUPPORTED}."
        )
