"""Registering strategies by name, so that Python, the CLI and YAML recipes can all say ``"gradual_unfreeze"``."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from cvft.errors import StrategyError
from cvft.signatures import forwarded_signature
from cvft.strategies.base import Strategy

__all__ = [
    "StrategySpec",
    "register_strategy",
    "get_strategy",
    "available_strategies",
    "build_strategy",
    "build_strategies",
    "strategy_signature",
]

_REGISTRY: dict[str, type[Strategy]] = {}
S = TypeVar("S", bound=type[Strategy])

#: What :func:`build_strategy` accepts: a registered name, ``{"name": ..., **kwargs}`` or an instance.
StrategySpec = str | Mapping[str, Any] | Strategy


def register_strategy(cls: S) -> S:
    """Class decorator that registers a :class:`Strategy` subclass under its ``name``.

    Raises:
        StrategyError: Another class already holds the name.

    Example:
        >>> @register_strategy
        ... class Noop(Strategy):
        ...     name = "noop_doc_example"
        >>> get_strategy("noop_doc_example") is Noop
        True
    """
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        raise TypeError(f"register_strategy expects a Strategy subclass, got {cls!r}.")
    name = cls.name
    existing = _REGISTRY.get(name)
    # the same class defined again (module reloaded) may re-register; any other class may not take the name
    if existing is not None and (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
        raise StrategyError(
            f"Strategy name {name!r} is already registered by {existing.__module__}.{existing.__qualname__}. "
            "Choose another `name` for your class."
        )
    _REGISTRY[name] = cls
    return cls


def available_strategies() -> list[str]:
    """Registered strategy names, sorted."""
    return sorted(_REGISTRY)


def get_strategy(name: str) -> type[Strategy]:
    """Look up a registered strategy class.

    Raises:
        StrategyError: Unknown name; the message lists close matches and all registered names.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise StrategyError(
            f"Unknown strategy {name!r}.{hint} Registered strategies: {', '.join(available_strategies())}."
        ) from None


def strategy_signature(cls: type[Strategy]) -> inspect.Signature:
    """The options ``cls`` takes, those its ``**kwargs`` pass on to its base classes included.

    :func:`cvft.signatures.forwarded_signature` of a strategy class (the low-rank strategies declare only the options
    they add).

    Example:
        >>> from cvft.strategies.lora import LoRA
        >>> list(strategy_signature(LoRA).parameters)
        ['rank', 'alpha', 'dropout', 'targets', 'train_head', 'train_bias', 'qkv_parts', 'use_rslora']
    """
    return forwarded_signature(cls)


def build_strategy(spec: StrategySpec) -> Strategy:
    """Build one strategy from a name, a ``{"name": ..., **kwargs}`` mapping, or pass an instance through.

    Parameter strategies (``takes_bn``) also accept ``bn``, the BatchNorm policy (see :mod:`cvft.strategies.base`).
    The other keys are checked against :func:`strategy_signature` (options forwarded to base classes included).

    Raises:
        StrategyError: Unknown name, a mapping without ``name``, or arguments the strategy does not take.

    Example:
        >>> build_strategy({"name": "freeze_layers", "num_groups": 2})
        FreezeLayers(train_bn=False, num_groups=2, patterns=None)
    """
    if isinstance(spec, Strategy):
        return spec
    if isinstance(spec, str):
        name, kwargs = spec, {}
    elif isinstance(spec, Mapping):
        kwargs = dict(spec)
        name = kwargs.pop("name", None)
        if not isinstance(name, str):
            raise StrategyError(f"A strategy given as a mapping needs a 'name' key, got {dict(spec)!r}.")
    else:
        raise StrategyError(f"Cannot build a strategy from {spec!r}; give a name, a mapping or a Strategy.")
    cls = get_strategy(name)
    bn = kwargs.pop("bn", None) if cls.takes_bn else None  # the BatchNorm policy every parameter strategy takes
    signature = strategy_signature(cls)
    try:
        signature.bind(**kwargs)
    except TypeError as err:
        hint = " (`bn` is taken by parameter strategies only)" if "bn" in kwargs else ""
        raise StrategyError(f"Strategy {name!r}: {err}{hint}. Its signature is {name}{signature}.") from None
    strategy = cls(**kwargs)
    return strategy.with_bn(bn) if bn is not None else strategy


def build_strategies(specs: StrategySpec | Iterable[StrategySpec] | None) -> list[Strategy]:
    """Build a list of strategies; a string may name several, comma-separated (``"lora,gradual_unfreeze"``)."""
    if specs is None:
        return []
    if isinstance(specs, str):
        specs = [part.strip() for part in specs.split(",") if part.strip()]
    elif isinstance(specs, (Mapping, Strategy)):
        specs = [specs]
    return [build_strategy(spec) for spec in specs]
