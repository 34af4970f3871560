"""Setting up classifier strategies on a backbone whose heads live elsewhere (multi-task heads, detection heads).

Parameter strategies (``linear_probe``, ``lora``, adapters, gradual unfreezing) are written against a timm model
*with* a classifier: ``train_head`` keeps it trainable and ``layerwise_lr`` decays from it down. A backbone that
feeds other heads (a :class:`~cvft.tasks.MultiTaskClassifier`'s task heads, an
:class:`~cvft.tasks.ObjectDetector`'s FPN and box heads) is created with ``num_classes=0``.
:func:`setup_headless` gives it a one-output placeholder classifier while the strategies are set up and removes it
again afterwards, so every strategy runs unchanged, "train the head" becomes a no-op, and the caller's own heads
always train.
"""

from __future__ import annotations

from torch import nn

from cvft.errors import StrategyError
from cvft.strategies.base import StrategyStack

__all__ = ["setup_headless"]


def setup_headless(backbone: nn.Module, stack: StrategyStack) -> dict[str, float]:
    """Set up ``stack`` on a timm ``backbone`` created with ``num_classes=0``; return its learning-rate scales.

    Learning-rate scales are taken while the placeholder head is there, so that layer-wise decay counts from the
    heads (scale 1) down, as it does for an :class:`~cvft.tasks.ImageClassifier`.

    Args:
        backbone: A timm model without classifier (``num_classes=0``); it needs ``reset_classifier``.
        stack: The strategies to set up, in order.

    Returns:
        Learning-rate multipliers by backbone parameter name (empty for an empty stack).

    Raises:
        StrategyError: ``backbone`` has no ``reset_classifier`` (not a timm model).

    Example:
        >>> import timm
        >>> from cvft.strategies import StrategyStack, build_strategies
        >>> backbone = timm.create_model("test_vit", num_classes=0)
        >>> scales = setup_headless(backbone, StrategyStack(build_strategies(["lora"])))
        >>> any(p.requires_grad for n, p in backbone.named_parameters() if "lora" not in n)
        False
        >>> backbone.num_classes
        0
    """
    if not len(stack):
        return {}
    if not callable(getattr(backbone, "reset_classifier", None)):
        raise StrategyError(
            f"{type(backbone).__name__} has no reset_classifier(); strategies on a headless backbone need a timm "
            "model created with num_classes=0."
        )
    backbone.reset_classifier(1)
    stack.setup(backbone)
    scales = stack.lr_scales(backbone)
    backbone.reset_classifier(0)
    return scales
