"""Names that moved to another module stay importable from their old one for a release, with a warning.

A module whose public names moved elsewhere assigns :func:`moved_names` to its module-level ``__getattr__``
(PEP 562). The old import keeps working, warns :class:`DeprecationWarning` the first time with the new place, and the
new module is imported only then: a lower layer that lists a name moved to a higher one does not import that layer
until someone asks for the old name.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["moved_names"]


def moved_names(module: str, moved: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving the ``moved`` names (name -> the module they moved to) with a warning.

    Args:
        module: The old module's ``__name__``.
        moved: Each moved name and the module that now holds it.

    Returns:
        The ``__getattr__`` to assign in the old module. The first access of a moved name warns and keeps the object
        in the old module, so later accesses neither warn nor import again.

    Example:
        >>> import types, warnings
        >>> old = types.ModuleType("old_home")
        >>> sys.modules["old_home"] = old
        >>> old.__getattr__ = moved_names("old_home", {"dumps": "json"})
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     from old_home import dumps
        >>> dumps([1]), str(caught[0].message)
        ('[1]', 'old_home.dumps moved to json.dumps; import it from there (the old path will be removed).')
        >>> del sys.modules["old_home"]
    """

    def __getattr__(name: str) -> Any:
        target = moved.get(name)
        if target is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(
            f"{module}.{name} moved to {target}.{name}; import it from there (the old path will be removed).",
            DeprecationWarning,
            stacklevel=2,
        )
        value = getattr(importlib.import_module(target), name)
        setattr(sys.modules[module], name, value)
        return value

    return __getattr__
