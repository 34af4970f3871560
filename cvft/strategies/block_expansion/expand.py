"""Inserting identity copies of blocks into a timm model's block sequences, and what a deeper timm model needs.

The copies go *into* the ``nn.Sequential`` that holds the blocks, so the model keeps timm's layout and contract:
the blocks are renumbered (inserting after ``blocks.2`` of a ViT makes the copy ``blocks.3`` and the old ``blocks.3``
``blocks.4``), exactly as in a timm model created deeper, and ``forward_features``, ``forward_intermediates`` and
``group_matcher`` see the new blocks. A ViT's ``feature_info`` lists one entry per block; it gets an entry for each
copy (module names renumbered), so that feature-level indices (detection's default: the last one) still address
the model's blocks. CNN ``feature_info`` entries name whole stages and do not change.

The model records what was inserted in :data:`EXPANSION_ATTR`; :func:`timm_depth_kwargs` turns the new depths
into the ``timm.create_model`` arguments of the equivalent deeper model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn

from cvft.strategies._freeze import _ADAPTER_BUFFERS_ATTR, _GUARD_ATTR
from cvft.strategies.block_expansion.blocks import BlockSite, zero_residual_branches

__all__ = ["EXPANSION_ATTR", "insert_identity_blocks", "inserted_block_names", "timm_depth_kwargs"]

#: Attribute of an expanded model: ``{"inserted": [module names of the copies], "depths": {stage: new length}}``.
EXPANSION_ATTR = "cvft_block_expansion"


def _identity_copy(block: nn.Module) -> nn.Module:
    """A deep copy of ``block`` with its residual branches zeroed and no hooks or cvft markers of the original."""
    clone = copy.deepcopy(block)
    for module in clone.modules():
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
        for attr in (_GUARD_ATTR, _ADAPTER_BUFFERS_ATTR):  # BatchNorm policy state; the strategy sets it anew
            if attr in vars(module):
                delattr(module, attr)
    zero_residual_branches(clone)
    return clone


def _renumber(feature_info: Any, renamed: dict[str, str], copies_after: dict[str, list[str]]) -> None:
    """Rename block entries of ``feature_info`` (a list of dicts) and add one entry per copy after its source."""
    try:
        entries = list(feature_info)
        names = [entry["module"] for entry in entries]
    except (TypeError, KeyError):
        return
    if not any(name in renamed for name in names):
        return  # entries name stages (CNNs), which keep their names
    updated = []
    for entry in entries:
        name = entry["module"]
        updated.append({**entry, "module": renamed.get(name, name)})
        updated += [{**entry, "module": new_name} for new_name in copies_after.get(name, [])]
    feature_info[:] = updated


def insert_identity_blocks(model: nn.Module, sources: Sequence[BlockSite]) -> list[str]:
    """Insert after each block of ``sources`` an identity-initialised deep copy of it (in place).

    Args:
        model: The timm model whose ``sources`` were found by :func:`~.blocks.find_block_sites`.
        sources: Distinct, eligible blocks to copy.

    Returns:
        The module names of the inserted blocks, in forward order.

    Example:
        >>> import timm, torch
        >>> from cvft.strategies.block_expansion.blocks import find_block_sites
        >>> model = timm.create_model("test_vit", num_classes=3).eval()
        >>> x = torch.randn(1, 3, 32, 32)
        >>> reference = model(x)
        >>> insert_identity_blocks(model, find_block_sites(model)[2:3])
        ['blocks.3']
        >>> len(model.blocks), len(model.feature_info), torch.equal(model(x), reference)
        (7, 7, True)
    """
    by_stage: dict[str, set[int]] = {}
    for site in sources:
        by_stage.setdefault(site.stage, set()).add(site.position)
    renamed: dict[str, str] = {}
    copies_after: dict[str, list[str]] = {}
    inserted: list[str] = []
    depths: dict[str, int] = {}
    for stage_name, positions in by_stage.items():
        stage = model.get_submodule(stage_name)
        blocks: list[nn.Module] = []
        for position, block in enumerate(stage):
            old_name = f"{stage_name}.{position}"
            renamed[old_name] = f"{stage_name}.{len(blocks)}"
            blocks.append(block)
            if position in positions:
                new_name = f"{stage_name}.{len(blocks)}"
                blocks.append(_identity_copy(block))
                copies_after[old_name] = [new_name]
                inserted.append(new_name)
        for index in range(len(stage) - 1, -1, -1):
            del stage[index]
        for index, block in enumerate(blocks):
            stage.add_module(str(index), block)
        depths[stage_name] = len(blocks)
    _renumber(getattr(model, "feature_info", None), renamed, copies_after)
    record = getattr(model, EXPANSION_ATTR, {"inserted": [], "depths": {}})
    order = [name for name, _ in model.named_modules()]
    record = {
        "inserted": sorted(set(record["inserted"]) | set(inserted), key=order.index),
        "depths": {**record["depths"], **depths},
    }
    setattr(model, EXPANSION_ATTR, record)
    return sorted(inserted, key=order.index)


def inserted_block_names(model: nn.Module) -> list[str]:
    """Module names of the blocks ``block_expansion`` inserted into ``model`` (empty when none).

    Example:
        >>> import timm
        >>> inserted_block_names(timm.create_model("test_resnet"))
        []
    """
    return list(getattr(model, EXPANSION_ATTR, {}).get("inserted", []))


def timm_depth_kwargs(model: nn.Module) -> dict[str, Any]:
    """``timm.create_model`` arguments that build the expanded ``model``'s architecture (empty when not expanded).

    ViT: ``depth``; ResNet: ``layers`` (blocks per stage); ConvNeXt: ``depths``. A timm model created with them has
    the same module names and shapes, so the expanded model's state dict loads into it.

    Raises:
        StrategyError: The model was expanded but timm has no depth argument for its family.

    Example:
        >>> import timm
        >>> from cvft.strategies.block_expansion.blocks import find_block_sites
        >>> model = timm.create_model("test_convnext")
        >>> _ = insert_identity_blocks(model, find_block_sites(model)[:1])
        >>> timm_depth_kwargs(model)
        {'depths': [2, 2, 4, 2]}
    """
    if not inserted_block_names(model):
        return {}
    from timm.models.convnext import ConvNeXt
    from timm.models.resnet import ResNet
    from timm.models.vision_transformer import VisionTransformer

    if type(model) is VisionTransformer:
        return {"depth": len(model.blocks)}
    if type(model) is ResNet:
        return {"layers": [len(getattr(model, f"layer{i}")) for i in range(1, 5)]}
    if type(model) is ConvNeXt:
        return {"depths": [len(stage.blocks) for stage in model.stages]}
    from cvft.errors import StrategyError

    raise StrategyError(
        f"block_expansion: timm has no depth argument known to cvft for {type(model).__name__}; export ONNX "
        "(cvft export --onnx) or share the adapter file instead of a plain state dict."
    )
