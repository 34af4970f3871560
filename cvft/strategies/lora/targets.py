"""Choosing which layers of a model LoRA adapts.

A target is a module name, a regular expression full-matched against module names, a layer type name
(``"Linear"``, ``"Conv2d"``) or a preset:

=================== ====================================================================================
``vit_attention``   the fused ``attn.qkv`` and the output ``attn.proj`` of every transformer block
``vit_mlp``         ``mlp.fc1`` and ``mlp.fc2`` of every transformer block
``vit_all``         both of the above
``resnet_blocks``   ``conv1`` / ``conv2`` / ``conv3`` of the blocks in ``layer1`` .. ``layer4``
``convnext_blocks`` ``conv_dw``, ``mlp.fc1`` and ``mlp.fc2`` of every ConvNeXt block
=================== ====================================================================================

and the family-independent named selectors of :mod:`cvft.strategies.selectors` (``pointwise``, ``spatial``,
``attention``, ``mlp``, ``all_linear``, ``all_conv`` and ``auto``), built on layer types, kernel sizes and timm's
block structure rather than on names; prefer them, the presets above are kept for existing recipes.

Only ``nn.Linear`` and ``nn.Conv2d`` layers are candidates, the classifier head never is, and a target that matches
nothing is an error that lists the candidates.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from cvft.backbones.layer_groups import head_parameter_names
from cvft.strategies._targets import compile_target, select_targets
from cvft.strategies.lora.layer import LoRALayer
from cvft.strategies.selectors import SELECTORS, select_layers

__all__ = ["PRESETS", "TYPE_NAMES", "candidate_modules", "find_targets"]

PRESETS: dict[str, tuple[str, ...]] = {
    "vit_attention": (r"(.*\.)?attn\.qkv", r"(.*\.)?attn\.proj"),
    "vit_mlp": (r"(.*\.)?blocks\.\d+\.mlp\.fc[12]",),
    "vit_all": (r"(.*\.)?attn\.qkv", r"(.*\.)?attn\.proj", r"(.*\.)?blocks\.\d+\.mlp\.fc[12]"),
    "resnet_blocks": (r"layer[1-4]\.\d+\.conv[123]",),
    "convnext_blocks": (r"stages\.\d+\.blocks\.\d+\.(conv_dw|mlp\.fc1|mlp\.fc2)",),
}
TYPE_NAMES: dict[str, type[nn.Module]] = {"Linear": nn.Linear, "Conv2d": nn.Conv2d}


def candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Linear and Conv2d layers LoRA may adapt: outside the classifier head and outside existing LoRA layers."""
    head = head_parameter_names(model)
    wrapped = [name for name, module in model.named_modules() if isinstance(module, LoRALayer)]
    candidates = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or isinstance(module, LoRALayer):
            continue
        if any(name == w or name.startswith(w + ".") for w in wrapped):
            continue
        own = {f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)}
        if own & head:
            continue
        candidates[name] = module
    return candidates


_HINT = (
    f"Give module names, regular expressions full-matching them, a type name ({', '.join(TYPE_NAMES)}) or a preset "
    f"({', '.join([*SELECTORS, *PRESETS])})."
)


def _matches(target: str, candidates: dict[str, nn.Module], model: nn.Module) -> list[str]:
    if target in SELECTORS:
        return select_layers(model, target, candidates)
    if target in PRESETS:
        patterns = [re.compile(p) for p in PRESETS[target]]
        return [name for name in candidates if any(p.fullmatch(name) for p in patterns)]
    if target in TYPE_NAMES:
        return [name for name, module in candidates.items() if isinstance(module, TYPE_NAMES[target])]
    if target in candidates:
        return [target]
    pattern = compile_target("lora", target)
    return [name for name in candidates if pattern.fullmatch(name)]


def find_targets(model: nn.Module, targets: str | Sequence[str] = "auto") -> list[str]:
    r"""Names of the layers to adapt, in model order.

    Args:
        model: The model to search.
        targets: A preset name, a type name, a module name or regex, or a list of them (their union).

    Raises:
        StrategyError: A target matches nothing; the message lists candidate layers.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit")
        >>> find_targets(model, "vit_attention")[:2]
        ['blocks.0.attn.qkv', 'blocks.0.attn.proj']
        >>> find_targets(model, [r"blocks\.0\.mlp\.fc1", "blocks.5.attn.proj"])
        ['blocks.0.mlp.fc1', 'blocks.5.attn.proj']
    """
    candidates = candidate_modules(model)
    what = f"Linear or Conv2d layer of {type(model).__name__} outside the classifier head"
    return select_targets("lora", targets, candidates, lambda t: _matches(t, candidates, model), what, _HINT)
