"""The options a class takes when its constructor forwards ``**kwargs`` to its base classes."""

from __future__ import annotations

import inspect

__all__ = ["forwarded_signature"]


def forwarded_signature(cls: type) -> inspect.Signature:
    """The options ``cls`` takes: those of its ``__init__`` and those its ``**kwargs`` pass on to its base classes.

    A subclass may declare only the options it adds and forward the rest with ``**kwargs`` (the low-rank strategies
    and the tasks do; LightningCLI follows such forwarding the same way). The options are collected along the MRO,
    through every ``__init__`` that takes ``**kwargs``, as keyword-only parameters: each where the most basic class
    declares it, with the default and type of the most derived one. A class whose ``__init__`` takes no ``**kwargs``
    has its plain signature.

    Example:
        >>> class Base:
        ...     def __init__(self, *, lr: float = 0.1, momentum: float = 0.9) -> None: ...
        >>> class Task(Base):
        ...     def __init__(self, num_classes: int = 2, lr: float = 0.3, **kwargs) -> None:
        ...         super().__init__(lr=lr, **kwargs)
        >>> [(p.name, p.default) for p in forwarded_signature(Task).parameters.values()]
        [('lr', 0.3), ('momentum', 0.9), ('num_classes', 2)]
    """
    signature = inspect.signature(cls)
    if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return signature
    declared: list[list[inspect.Parameter]] = []  # most derived first
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None or klass is object:
            continue
        parameters = list(inspect.signature(init).parameters.values())[1:]  # without self
        declared.append(parameters)
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    options: dict[str, inspect.Parameter] = {}
    for parameters in reversed(declared):  # a redeclared option keeps its place and takes the derived default
        for p in parameters:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                options[p.name] = p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
    return signature.replace(parameters=list(options.values()))
