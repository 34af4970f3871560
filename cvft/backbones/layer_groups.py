"""Ordered layer groups, from stem to head, for any timm model.

Layer groups are the single source that freezing, gradual unfreezing and layer-wise learning rates use. They come
from the model's own ``group_matcher`` (the same contract timm's layer-decay optimizer uses), so a strategy written
against them works on every timm ViT or CNN, not only on the ones we test. The classifier head always forms the
last group of its own, even when timm's matcher lumps it together with the final norm.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from cvft.errors import StrategyError

__all__ = ["LayerGroup", "layer_groups", "head_parameter_names", "find_layer_groups"]

_MAX_NAME_PARTS = 3


@dataclass(frozen=True)
class LayerGroup:
    """A named, ordered slice of a model's parameters.

    Attributes:
        index: Position from the stem (0) to the head (last).
        name: Readable name built from the module paths it holds, e.g. ``"blocks.3"`` or ``"head"``.
        parameter_names: Names as given by ``model.named_parameters()``.
        is_head: Whether this is the classifier head.
    """

    index: int
    name: str
    parameter_names: tuple[str, ...]
    is_head: bool = False

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Return this group's parameter tensors from ``model``."""
        named = dict(model.named_parameters())
        return [named[name] for name in self.parameter_names]


def head_parameter_names(model: nn.Module) -> set[str]:
    """Names of the classifier head's parameters.

    Uses timm's ``get_classifier()`` (both heads of a distilled DeiT); a model without it (a plain ``nn.Module``)
    has no recognised head.

    Example:
        >>> import timm
        >>> sorted(head_parameter_names(timm.create_model("test_resnet", num_classes=3)))
        ['fc.bias', 'fc.weight']
        >>> deit = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=3, depth=1)
        >>> sorted(head_parameter_names(deit))
        ['head.bias', 'head.weight', 'head_dist.bias', 'head_dist.weight']
    """
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is None:
        return set()
    head = get_classifier()
    parts = head if isinstance(head, tuple) else (head,)  # distilled DeiT: (head, head_dist)
    head_ids = {id(p) for part in parts if isinstance(part, nn.Module) for p in part.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in head_ids}


def _group_name(parameter_names: Iterable[str]) -> str:
    """Name a group by its parameters' deepest common module path (``blocks.3``, ``stages.1.blocks.0``).

    Groups without a common path join their distinct top-level names (``cls_token+pos_embed+patch_embed``).
    """
    module_paths = [name.split(".")[:-1] or [name] for name in parameter_names]
    common = _common_prefix(module_paths)
    if common:
        return ".".join(common)
    by_top: dict[str, list[list[str]]] = {}
    for parts in module_paths:
        by_top.setdefault(parts[0], []).append(parts)
    tops = [".".join(_common_prefix(paths)) for paths in by_top.values()]
    if len(tops) > _MAX_NAME_PARTS:
        return "+".join(tops[:_MAX_NAME_PARTS]) + f"+{len(tops) - _MAX_NAME_PARTS}more"
    return "+".join(tops)


def _common_prefix(paths: list[list[str]]) -> list[str]:
    common: list[str] = []
    for parts in zip(*paths, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return common


def _unique(names: list[str]) -> list[str]:
    """Suffix repeated names with ``#2``, ``#3`` ... so that every group name is unique."""
    seen: dict[str, int] = {}
    result = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        result.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return result


def _ordered_groups_from_matcher(model: nn.Module, coarse: bool) -> list[list[str]]:
    from timm.models import group_parameters

    mapping = group_parameters(model, model.group_matcher(coarse=coarse))
    return [list(mapping[key]) for key in sorted(mapping)]


def _ordered_groups_from_children(model: nn.Module) -> list[list[str]]:
    """Fallback for models without ``group_matcher``: one group per top-level child, in registration order."""
    groups: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        groups.setdefault(name.split(".")[0] if "." in name else "", []).append(name)
    return [names for names in groups.values() if names]


def layer_groups(model: nn.Module, coarse: bool = False) -> list[LayerGroup]:
    """Split ``model``'s parameters into ordered groups from stem to head.

    Args:
        model: A timm model (uses ``group_matcher``) or any ``nn.Module`` (one group per top-level child).
        coarse: Ask timm for coarse groups (whole stages) instead of fine ones (single blocks).

    Returns:
        Groups ordered from the input side to the output side. Every parameter is in exactly one group; the
        classifier head, when the model has one, is the last group and has ``is_head=True``.

    Example:
        >>> import timm
        >>> groups = layer_groups(timm.create_model("test_vit"))
        >>> groups[0].name, groups[-1].name, groups[-1].is_head
        ('cls_token+pos_embed+patch_embed.proj', 'head', True)
    """
    if callable(getattr(model, "group_matcher", None)):
        ordered = _ordered_groups_from_matcher(model, coarse)
    else:
        ordered = _ordered_groups_from_children(model)

    head_names = head_parameter_names(model)
    body = [[n for n in names if n not in head_names] for names in ordered]
    body = [names for names in body if names]
    all_names = [n for n, _ in model.named_parameters()]
    head = [n for n in all_names if n in head_names]

    members = body + ([head] if head else [])
    names = _unique([_group_name(params) for params in members])
    return [
        LayerGroup(index=i, name=name, parameter_names=tuple(params), is_head=bool(head) and i == len(members) - 1)
        for i, (name, params) in enumerate(zip(names, members, strict=True))
    ]


def find_layer_groups(groups: list[LayerGroup], patterns: Iterable[str]) -> list[LayerGroup]:
    """Select groups whose name or any parameter name matches one of the regex ``patterns``.

    Raises:
        StrategyError: A pattern matches no group; the message lists the group names to choose from.

    Example:
        >>> import timm
        >>> groups = layer_groups(timm.create_model("test_resnet"))
        >>> [g.name for g in find_layer_groups(groups, [r"^layer[12]"])]
        ['layer1.0', 'layer2.0']
    """
    selected: list[LayerGroup] = []
    for pattern in patterns:
        regex = re.compile(pattern)
        hits = [g for g in groups if regex.search(g.name) or any(regex.search(n) for n in g.parameter_names)]
        if not hits:
            names = ", ".join(g.name for g in groups)
            raise StrategyError(f"Layer pattern {pattern!r} matches no layer group. Groups are: {names}.")
        selected.extend(g for g in hits if g not in selected)
    return sorted(selected, key=lambda g: g.index)
