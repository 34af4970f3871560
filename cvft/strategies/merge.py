"""Folding every mergeable method into the model at once, and telling which ones cannot be folded.

Low-rank updates (LoRA, LoHA, LoKr, shared LoRA, QLoRA), sparse deltas, filter (row) deltas and SSF affines fold
exactly into the weights they modify, so a model fine-tuned with them becomes a plain timm model again. Prefix
re-parameterisation folds into plain prefixes. Bottleneck adapters, prompts, prefixes and side modules add
computation a plain timm model does not have; :func:`unfoldable_modules` names them so that exporters can say so.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from cvft.strategies.aux import remove_aux_modules
from cvft.strategies.filter_select import merge_filter_select
from cvft.strategies.lowrank import export_plain_model
from cvft.strategies.prompts import fold_prefix
from cvft.strategies.qat import convert_qat
from cvft.strategies.sparse import merge_sparse
from cvft.strategies.ssf import fold_ssf

__all__ = ["fold_all", "unfoldable_modules"]


def fold_all(model: nn.Module) -> nn.Module:
    """Fold, in place, every method that can be folded: low-rank updates, sparse and row deltas, SSF, prefix encoders.

    Fake-quantised (``qat``) layers become plain layers with their trained float weights again (torchao's convert
    step); quantise the result to int8 (``cvft export --quantize``) to get the model QAT trained for.

    Outputs stay the same (up to float rounding); wrappers are replaced by the plain layers they wrapped, and
    training-only modules (``model.cvft_aux``: projection heads, feature projectors) are dropped.

    Example:
        >>> import timm, torch
        >>> from cvft.strategies import apply_strategies
        >>> model = timm.create_model("test_resnet", num_classes=3)
        >>> keys = list(model.state_dict())
        >>> _ = apply_strategies(model, [{"name": "lora", "rank": 2}, {"name": "sparse", "budget": 100}])
        >>> list(fold_all(model).state_dict()) == keys
        True
    """
    export_plain_model(model)
    convert_qat(model)  # fake-quantised layers back to plain ones with the trained float weights
    merge_sparse(model)
    merge_filter_select(model)
    fold_ssf(model)
    fold_prefix(model)
    remove_aux_modules(model)
    return model


def unfoldable_modules(model: nn.Module, plain_keys: Iterable[str]) -> list[str]:
    """State-dict keys of ``model`` that a plain model with ``plain_keys`` lacks, grouped by their module.

    Call it after :func:`fold_all`; an empty list means the model is a plain timm model again.

    Example:
        >>> import timm
        >>> from cvft.strategies import apply_strategies
        >>> plain = timm.create_model("test_vit", num_classes=3).state_dict()
        >>> model = timm.create_model("test_vit", num_classes=3)
        >>> _ = apply_strategies(model, [{"name": "vpt", "num_tokens": 2}])
        >>> unfoldable_modules(fold_all(model), plain)
        ['visual_prompts']
    """
    plain = set(plain_keys)
    extra = [key for key in model.state_dict() if key not in plain]
    owners: list[str] = []
    for key in extra:
        owner = key.rsplit(".", 1)[0]
        if owner not in owners:
            owners.append(owner)
    return owners
