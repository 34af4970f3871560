"""Which layers the low-rank methods adapt: ``nn.Linear`` and ``nn.Conv2d`` layers, resolved by the shared resolver.

A target is a named selector of :mod:`cvft.strategies.selectors` (``auto``, ``pointwise``, ``attention`` ...), a
legacy preset of :data:`cvft.strategies.targets.PRESETS` (``vit_attention``, ``resnet_blocks`` ...), a layer type
name (``"Linear"``, ``"Conv2d"``), a module name or a regular expression full-matched against module names. The
classifier head is never a candidate, nor is anything inside an existing low-rank layer; a target that matches
nothing is an error that lists the candidates.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from cvft.strategies.lowrank.layer import LowRankLayer
from cvft.strategies.selectors import SELECTORS
from cvft.strategies.targets import (
    PRESETS,
    candidate_layers,
    preset_shortcuts,
    resolve_targets,
    selector_shortcuts,
    type_shortcuts,
)

__all__ = ["TYPE_NAMES", "find_low_rank_targets", "low_rank_candidates"]

TYPE_NAMES: dict[str, type[nn.Module]] = {"Linear": nn.Linear, "Conv2d": nn.Conv2d}
_SHORTCUTS = {**selector_shortcuts(), **preset_shortcuts(), **type_shortcuts(TYPE_NAMES)}
_HINT = (
    f"Give module names, regular expressions full-matching them, a type name ({', '.join(TYPE_NAMES)}) or a preset "
    f"({', '.join([*SELECTORS, *PRESETS])})."
)


def _is_low_rank_layer(module: nn.Module) -> bool:
    return isinstance(module, LowRankLayer)


def low_rank_candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Linear and Conv2d layers a low-rank method may adapt: outside the head and outside existing low-rank layers.

    Example:
        >>> import timm
        >>> list(low_rank_candidates(timm.create_model("test_vit")))[:2]
        ['patch_embed.proj', 'blocks.0.attn.qkv']
    """
    return candidate_layers(model, lambda module: isinstance(module, (nn.Linear, nn.Conv2d)), _is_low_rank_layer)


def find_low_rank_targets(model: nn.Module, targets: str | Sequence[str] = "auto", method: str = "lora") -> list[str]:
    r"""Names of the layers to adapt, in model order.

    Args:
        model: The model to search.
        targets: A selector or preset name, a type name, a module name or regex, or a list of them (their union).
        method: The method named in error messages (``"lora"``, ``"loha"`` ...).

    Raises:
        StrategyError: A target matches nothing; the message lists candidate layers.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit")
        >>> find_low_rank_targets(model, "vit_attention")[:2]
        ['blocks.0.attn.qkv', 'blocks.0.attn.proj']
        >>> find_low_rank_targets(model, [r"blocks\.0\.mlp\.fc1", "blocks.5.attn.proj"])
        ['blocks.0.mlp.fc1', 'blocks.5.attn.proj']
    """
    what = f"Linear or Conv2d layer of {type(model).__name__} outside the classifier head"
    return resolve_targets(method, model, targets, low_rank_candidates(model), _SHORTCUTS, description=what, hint=_HINT)
