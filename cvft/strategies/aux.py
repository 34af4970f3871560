"""Training-only modules a strategy attaches to the backbone: projection heads, feature projectors.

They live in one ``nn.ModuleDict`` at ``model.cvft_aux`` so that they move with the model (device, DDP, FSDP), are
optimised with it, saved in checkpoints and adapter files (training can go on from either), and are dropped in one
place when the model is exported (:func:`remove_aux_modules`, called by ``fold_all``): a supervised-contrastive
projection head or a distillation projector never reaches inference.
"""

from __future__ import annotations

from torch import nn

__all__ = ["AUX_ATTR", "add_aux_module", "get_aux_module", "remove_aux_modules"]

AUX_ATTR = "cvft_aux"


def add_aux_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Attach ``module`` as ``model.cvft_aux[name]`` (on the device and dtype of the model's parameters).

    Example:
        >>> import timm
        >>> model = timm.create_model("test_resnet", num_classes=3)
        >>> _ = add_aux_module(model, "projection", nn.Linear(model.num_features, 8))
        >>> [n for n, _ in model.named_parameters() if n.startswith("cvft_aux")]
        ['cvft_aux.projection.weight', 'cvft_aux.projection.bias']
        >>> remove_aux_modules(model) is model and not hasattr(model, "cvft_aux")
        True
    """
    holder = getattr(model, AUX_ATTR, None)
    if holder is None:
        holder = nn.ModuleDict()
        setattr(model, AUX_ATTR, holder)
    reference = next(model.parameters(), None)
    if reference is not None:
        module = module.to(device=reference.device, dtype=reference.dtype)
    holder[name] = module
    return module


def get_aux_module(model: nn.Module, name: str) -> nn.Module | None:
    """``model.cvft_aux[name]``, or None."""
    holder = getattr(model, AUX_ATTR, None)
    return holder[name] if holder is not None and name in holder else None


def remove_aux_modules(model: nn.Module) -> nn.Module:
    """Drop every training-only module from ``model`` in place; return ``model``."""
    if hasattr(model, AUX_ATTR):
        delattr(model, AUX_ATTR)
    return model
