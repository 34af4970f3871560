"""Lazy imports of the optional medical-imaging dependencies (``pip install "cvft[medical]"``)."""

from __future__ import annotations

import importlib
from types import ModuleType

_PACKAGES = {"pydicom": "pydicom", "nibabel": "nibabel", "tifffile": "tifffile"}


def require(module: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or raise ``ImportError`` saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = _PACKAGES.get(module, module)
        raise ImportError(
            f"{purpose} needs the optional package {package!r}, which is not installed. "
            f'Install cvft\'s medical extras: pip install "cvft[medical]" (or pip install {package}).'
        ) from error


def optional(module: str) -> ModuleType | None:
    """Import an optional dependency, or return ``None`` when it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None
