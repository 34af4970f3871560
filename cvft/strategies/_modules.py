"""Replacing a sub-module by name: what every strategy that wraps layers (LoRA, adapters, SSF, sparse) needs."""

from __future__ import annotations

from torch import nn

__all__ = ["set_submodule"]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the sub-module ``name`` (dotted path) of ``model`` by ``module``.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2))
        >>> set_submodule(model, "0", nn.Identity())
        >>> model
        Sequential(
          (0): Identity()
        )
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
