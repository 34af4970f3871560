"""Finding, merging, unmerging and exporting the low-rank layers of a model, whatever the method that put them in.

Every low-rank update folds exactly into the weight it modifies, so these helpers work the same for LoRA, LoHA,
LoKr, shared LoRA and QLoRA (whose NF4 base is dequantised to merge and restored by unmerge).
"""

from __future__ import annotations

from torch import nn

from cvft.strategies._modules import set_submodule
from cvft.strategies.lowrank.layer import LowRankLayer

__all__ = ["export_plain_model", "low_rank_layers", "low_rank_parameter_names", "merge_low_rank", "unmerge_low_rank"]


def low_rank_layers(model: nn.Module) -> dict[str, LowRankLayer]:
    """Every low-rank wrapper in ``model``, by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LowRankLayer)}


def low_rank_parameter_names(model: nn.Module) -> set[str]:
    """Names (in ``model.named_parameters()``) of all low-rank update parameters, base weights excluded."""
    return {f"{name}.{p}" for name, layer in low_rank_layers(model).items() for p, _ in layer.lora_parameters()}


def merge_low_rank(model: nn.Module) -> None:
    """Fold every low-rank update into its base weight (inference without extra cost); merged layers stay."""
    for layer in low_rank_layers(model).values():
        layer.merge()


def unmerge_low_rank(model: nn.Module) -> None:
    """Take every low-rank update out of its base weight again."""
    for layer in low_rank_layers(model).values():
        layer.unmerge()


def export_plain_model(model: nn.Module) -> nn.Module:
    """Merge the updates and put the base layers back, in place; the result has exactly the original keys.

    The returned model (``model`` itself) loads into a freshly created timm model with ``strict=True``.

    Example:
        >>> import timm
        >>> from cvft.strategies import LoRA
        >>> model = timm.create_model("test_resnet", num_classes=3)
        >>> keys = list(model.state_dict())
        >>> LoRA(rank=2).setup(model)
        >>> list(export_plain_model(model).state_dict()) == keys
        True
    """
    merge_low_rank(model)
    for name, layer in low_rank_layers(model).items():
        set_submodule(model, name, layer.base)
    return model
