"""Resolving a strategy's ``targets`` (names, regexes, presets) against the layers it may wrap.

LoRA, SSF and sparse tuning differ in which layers are candidates and in the shortcuts they accept (presets, type
names, ``"all"``), not in how a list of targets is resolved or how a miss is reported: that part lives here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from torch import nn

from cvft.errors import StrategyError

__all__ = ["compile_target", "no_match_error", "select_targets"]

_MAX_LISTED = 30


def no_match_error(method: str, target: str, description: str, candidates: dict[str, nn.Module], hint: str):
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
    match: Callable[[str], list[str] | set[str]],
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
        found = match(entry)
        if not found:
            raise no_match_error(method, entry, description, candidates, hint)
        chosen.update(found)
    return [name for name in candidates if name in chosen]
