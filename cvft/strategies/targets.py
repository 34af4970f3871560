r"""Resolving a strategy's ``targets`` against the layers it may wrap: one resolver for every layer-wrapping method.

A method brings two things of its own: which modules are *candidates* (a predicate: LoRA and its low-rank peers take
``nn.Linear`` and ``nn.Conv2d``, QLoRA only ``nn.Linear``, SSF the layers it can fold into, sparse tuning Linear and
Conv2d weights) and which *shortcuts* it accepts. Everything else is done here, the same way for all of them:

* :func:`candidate_layers` keeps the modules the predicate takes, in model order, outside the classifier head and
  outside wrappers an earlier strategy put in;
* :func:`resolve_targets` reads each target as a shortcut, an exact module name or a regular expression full-matched
  against module names, and returns the union in model order;
* a target that matches nothing is an error that names it, lists the candidates and says how to write targets
  (:func:`no_match_error`); matching nothing is never silently accepted.

Shortcuts are the family-independent named selectors of :mod:`cvft.strategies.selectors` (``pointwise``,
``spatial``, ``block_convs``, ``attention``, ``mlp``, ``all_linear``, ``all_conv``, ``auto``), layer type names, and
the legacy family presets below, kept for existing recipes (prefer the selectors):

=================== ====================================================================================
``vit_attention``   the fused ``attn.qkv`` and the output ``attn.proj`` of every transformer block
``vit_mlp``         ``mlp.fc1`` and ``mlp.fc2`` of every transformer block
``vit_all``         both of the above
``resnet_blocks``   ``conv1`` / ``conv2`` / ``conv3`` of the blocks in ``layer1`` .. ``layer4``
``convnext_blocks`` ``conv_dw``, ``mlp.fc1`` and ``mlp.fc2`` of every ConvNeXt block
=================== ====================================================================================

Example:
    >>> import timm
    >>> model = timm.create_model("test_vit")
    >>> linears = candidate_layers(model, lambda m: isinstance(m, nn.Linear))
    >>> resolve_targets("demo", model, ["vit_attention", r"blocks\.5\.mlp\.fc2"], linears,
    ...                 preset_shortcuts(), description="Linear layer", hint="Give presets.")[-3:]
    ['blocks.5.attn.qkv', 'blocks.5.attn.proj', 'blocks.5.mlp.fc2']
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence

from torch import nn

from cvft.backbones.layer_groups import head_parameter_names
from cvft.errors import StrategyError
from cvft.strategies.selectors import SELECTORS, select_layers

__all__ = [
    "PRESETS",
    "Shortcut",
    "candidate_layers",
    "check_targets",
    "compile_target",
    "every_candidate",
    "no_match_error",
    "preset_shortcuts",
    "resolve_targets",
    "select_targets",
    "selector_shortcuts",
    "type_shortcuts",
]

#: Legacy presets of three model families: regular expressions full-matched against module names.
PRESETS: dict[str, tuple[str, ...]] = {
    "vit_attention": (r"(.*\.)?attn\.qkv", r"(.*\.)?attn\.proj"),
    "vit_mlp": (r"(.*\.)?blocks\.\d+\.mlp\.fc[12]",),
    "vit_all": (r"(.*\.)?attn\.qkv", r"(.*\.)?attn\.proj", r"(.*\.)?blocks\.\d+\.mlp\.fc[12]"),
    "resnet_blocks": (r"layer[1-4]\.\d+\.conv[123]",),
    "convnext_blocks": (r"stages\.\d+\.blocks\.\d+\.(conv_dw|mlp\.fc1|mlp\.fc2)",),
}

#: ``shortcut(model, candidates) -> names``: the candidates one named target selects.
Shortcut = Callable[[nn.Module, dict[str, nn.Module]], Iterable[str]]

_MAX_LISTED = 30


def candidate_layers(
    model: nn.Module,
    accepts: Callable[[nn.Module], bool],
    is_wrapper: Callable[[nn.Module], bool] = lambda module: False,
) -> dict[str, nn.Module]:
    """The modules of ``model`` that ``accepts``, by name in model order, outside the head and outside wrappers.

    Args:
        model: The model to search.
        accepts: The method's candidate predicate (e.g. ``isinstance(m, (nn.Linear, nn.Conv2d))``).
        is_wrapper: Which modules are wrappers an earlier strategy injected; they and everything inside them are
            left out, so a layer is never wrapped twice.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_resnet", num_classes=3)
        >>> layers = candidate_layers(model, lambda m: isinstance(m, (nn.Linear, nn.Conv2d)))
        >>> list(layers)[:2], "fc" in layers  # the classifier head is never a candidate
        (['conv1.0', 'conv1.3'], False)
    """
    head = head_parameter_names(model)
    wrappers: list[str] = []
    candidates: dict[str, nn.Module] = {}
    for name, module in model.named_modules():  # a parent comes before its children
        if any(name.startswith(wrapper + ".") for wrapper in wrappers):
            continue
        if is_wrapper(module):
            wrappers.append(name)
            continue
        if not accepts(module):
            continue
        if {f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)} & head:
            continue
        candidates[name] = module
    return candidates


def check_targets(
    method: str, targets: str | Sequence[str], hint: str = "a preset such as 'auto' or module names"
) -> str | list[str]:
    """A strategy's ``targets`` argument as it keeps it: a string unchanged, anything else as a new non-empty list.

    Args:
        method: The strategy named in the error message.
        targets: What the user gave.
        hint: What to give instead of an empty list, for the error message.

    Raises:
        StrategyError: ``targets`` is an empty sequence.

    Example:
        >>> check_targets("ssf", ("LayerNorm",))
        ['LayerNorm']
        >>> check_targets("ssf", [])
        Traceback (most recent call last):
        ...
        cvft.errors.StrategyError: ssf: `targets` is empty; give a preset such as 'auto' or module names.
    """
    if isinstance(targets, str):
        return targets
    listed = list(targets)
    if not listed:
        raise StrategyError(f"{method}: `targets` is empty; give {hint}.")
    return listed


def every_candidate(model: nn.Module, candidates: dict[str, nn.Module]) -> list[str]:
    """The shortcut that selects every candidate (``"all"``)."""
    return list(candidates)


def selector_shortcuts() -> dict[str, Shortcut]:
    """The named selectors of :mod:`cvft.strategies.selectors` as shortcuts."""

    def shortcut(selector: str) -> Shortcut:
        return lambda model, candidates: select_layers(model, selector, candidates)

    return {selector: shortcut(selector) for selector in SELECTORS}


def preset_shortcuts(presets: Mapping[str, Sequence[str]] = PRESETS) -> dict[str, Shortcut]:
    """Presets (lists of regular expressions full-matched against module names) as shortcuts."""

    def shortcut(patterns: Sequence[str]) -> Shortcut:
        compiled = [re.compile(p) for p in patterns]
        return lambda model, candidates: [name for name in candidates if any(p.fullmatch(name) for p in compiled)]

    return {preset: shortcut(patterns) for preset, patterns in presets.items()}


def type_shortcuts(type_names: Mapping[str, type[nn.Module] | tuple[type[nn.Module], ...]]) -> dict[str, Shortcut]:
    """Layer type names (``"Linear"``, ``"Conv2d"`` ...) as shortcuts selecting the candidates of those types."""

    def shortcut(types: type[nn.Module] | tuple[type[nn.Module], ...]) -> Shortcut:
        return lambda model, candidates: [name for name, module in candidates.items() if isinstance(module, types)]

    return {type_name: shortcut(types) for type_name, types in type_names.items()}


def no_match_error(
    method: str, target: str, description: str, candidates: dict[str, nn.Module], hint: str
) -> StrategyError:
    """The error for a target that matches nothing: what was searched, the candidates (up to 30) and ``hint``."""
    listed = [f"{name} ({type(module).__name__})" for name, module in candidates.items()][:_MAX_LISTED]
    more = f" and {len(candidates) - _MAX_LISTED} more" if len(candidates) > _MAX_LISTED else ""
    return StrategyError(
        f"{method}: target {target!r} matches no {description}. Candidates: {', '.join(listed) or 'none'}{more}. {hint}"
    )


def compile_target(method: str, target: str) -> re.Pattern[str]:
    """``target`` as a regular expression, or a clear error when it is neither a name nor a valid regex."""
    try:
        return re.compile(target)
    except re.error as err:
        raise StrategyError(
            f"{method}: target {target!r} is neither a module name nor a valid regex ({err})."
        ) from None


def select_targets(
    method: str,
    targets: str | Sequence[str],
    candidates: dict[str, nn.Module],
    match: Callable[[str], Iterable[str]],
    description: str,
    hint: str,
) -> list[str]:
    r"""Union of ``match(entry)`` over the entries of ``targets``, in candidate (model) order.

    Args:
        method: Strategy name, for messages.
        targets: One target or a list of them.
        candidates: The layers the method may wrap, by name, in model order.
        match: Names of the candidates one target entry selects.
        description: What a target must match, for the error (``"Linear or Conv2d layer of ViT ..."``).
        hint: How to write targets, for the errors.

    Raises:
        StrategyError: No targets, a target that is not a string, or one that matches nothing.

    Example:
        >>> layers = {"a.fc": nn.Linear(1, 1), "b.fc": nn.Linear(1, 1)}
        >>> select_targets("demo", ["b.fc", r"a\..*"], layers, lambda t: [n for n in layers if re.fullmatch(t, n)],
        ...                "layer", "Give names.")
        ['a.fc', 'b.fc']
    """
    entries = [targets] if isinstance(targets, str) else list(targets)
    if not entries:
        raise StrategyError(f"{method}: `targets` is empty. {hint}")
    chosen: set[str] = set()
    for entry in entries:
        if not isinstance(entry, str):
            raise StrategyError(f"{method}: targets must be strings, got {entry!r}.")
        found = set(match(entry))
        if not found:
            raise no_match_error(method, entry, description, candidates, hint)
        chosen.update(found)
    return [name for name in candidates if name in chosen]


def _named(method: str, target: str, candidates: dict[str, nn.Module], weight_names: bool) -> list[str]:
    if not weight_names:
        if target in candidates:
            return [target]
        pattern = compile_target(method, target)
        return [name for name in candidates if pattern.fullmatch(name)]
    pattern = compile_target(method, target)
    return [
        name for name in candidates if any(target == key or pattern.fullmatch(key) for key in (name, f"{name}.weight"))
    ]


def resolve_targets(
    method: str,
    model: nn.Module,
    targets: str | Sequence[str],
    candidates: dict[str, nn.Module],
    shortcuts: Mapping[str, Shortcut],
    *,
    description: str,
    hint: str,
    weight_names: bool = False,
) -> list[str]:
    """Names of the ``candidates`` that ``targets`` select, in model order.

    Each target is a key of ``shortcuts``, else an exact candidate name, else a regular expression full-matched
    against candidate names; a list selects the union of its entries.

    Args:
        method: Strategy name, for messages.
        model: The model the candidates belong to (selectors read its block structure).
        targets: One target or a list of them.
        candidates: The layers the method may wrap (see :func:`candidate_layers`).
        shortcuts: The named targets the method accepts.
        description: What a target must match, for the error.
        hint: How to write targets, for the errors.
        weight_names: Also accept weight names (``"blocks.0.attn.qkv.weight"``) where module names go, and match
            regular expressions against both.

    Raises:
        StrategyError: No targets, or a target that matches nothing; the message lists the candidates.
    """

    def match(target: str) -> Iterable[str]:
        if target in shortcuts:
            return shortcuts[target](model, candidates)
        return _named(method, target, candidates, weight_names)

    return select_targets(method, targets, candidates, match, description, hint)
