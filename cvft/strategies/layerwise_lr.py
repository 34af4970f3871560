"""Layer-wise learning-rate decay (Clark et al., ELECTRA 2020; BEiT): lower rates towards the stem."""

from __future__ import annotations

from torch import nn

from cvft.backbones.layer_groups import layer_groups
from cvft.errors import StrategyError
from cvft.strategies.base import Strategy
from cvft.strategies.registry import register_strategy

__all__ = ["LayerwiseLRDecay"]


@register_strategy
class LayerwiseLRDecay(Strategy):
    """Scale each layer group's learning rate by ``decay ** (num_groups - 1 - index)``.

    The head (last group) keeps the base rate; each group below it gets ``decay`` times the rate of the group
    above. Groups come from timm's ``group_matcher``, as in timm's own ``layer_decay`` optimizer option.

    Args:
        decay: Factor per group, in ``(0, 1]``. 0.65-0.75 are the usual values for ViT fine-tuning.
        coarse: Use timm's coarse groups (whole stages) instead of single blocks.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit", num_classes=3)
        >>> scales = LayerwiseLRDecay(decay=0.5).lr_scales(model)
        >>> scales["head.weight"], scales["blocks.5.mlp.fc1.weight"], scales["cls_token"]
        (1.0, 0.5, 0.0078125)
    """

    name = "layerwise_lr"

    def __init__(self, decay: float = 0.75, coarse: bool = False) -> None:
        if not 0.0 < decay <= 1.0:
            raise StrategyError(f"layerwise_lr: decay must be in (0, 1], got {decay}.")
        self.decay = float(decay)
        self.coarse = coarse

    def lr_scales(self, model: nn.Module) -> dict[str, float]:
        """Scale per parameter name."""
        groups = layer_groups(model, coarse=self.coarse)
        last = len(groups) - 1
        return {name: self.decay ** (last - g.index) for g in groups for name in g.parameter_names}
