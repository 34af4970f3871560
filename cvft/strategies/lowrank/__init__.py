"""The low-rank family's base: what LoRA, LoHA, LoKr, shared LoRA and QLoRA share, and what a new method builds on.

* :mod:`~cvft.strategies.lowrank.layer`: :class:`LowRankLayer`, a frozen base layer plus ``scaling * delta``,
  with the hyper-parameter checks, scaling, dropout and merge / unmerge of the whole family;
  :mod:`~cvft.strategies.lowrank.delta`: :class:`DeltaWeightLayer`, for updates built as a full delta weight.
* :mod:`~cvft.strategies.lowrank.strategy`: :class:`LowRankStrategy`, validated arguments and one ``setup`` that
  methods fill in with hooks (``make_layer``, ``layer_factory``, ``prepare_targets``).
* :mod:`~cvft.strategies.lowrank.targets`: which Linear and Conv2d layers are adapted.
* :mod:`~cvft.strategies.lowrank.merge`: merging, unmerging and exporting every low-rank layer of a model.

A new low-rank method is one folder beside ``lora/``: a layer (a :class:`DeltaWeightLayer` that defines
``delta_matrix``) and a registered :class:`LowRankStrategy` that defines ``make_layer``.

Example:
    >>> import timm, torch
    >>> from cvft.strategies import LoHA
    >>> model = timm.create_model("test_vit", num_classes=3).eval()
    >>> LoHA(rank=2, targets="vit_attention").setup(model)
    >>> names = list(low_rank_layers(model))
    >>> names[:2]
    ['blocks.0.attn.qkv', 'blocks.0.attn.proj']
    >>> merge_low_rank(model)
    >>> all(layer.merged for layer in low_rank_layers(model).values())
    True
"""

from cvft.strategies.lowrank.delta import DeltaWeightLayer
from cvft.strategies.lowrank.layer import LowRankLayer, check_low_rank_hyperparameters, low_rank_scaling
from cvft.strategies.lowrank.merge import (
    export_plain_model,
    low_rank_layers,
    low_rank_parameter_names,
    merge_low_rank,
    unmerge_low_rank,
)
from cvft.strategies.lowrank.strategy import LayerFactory, LowRankStrategy, inject_low_rank, wrap_layers
from cvft.strategies.lowrank.targets import find_low_rank_targets, low_rank_candidates

__all__ = [
    "LowRankLayer",
    "DeltaWeightLayer",
    "LowRankStrategy",
    "LayerFactory",
    "check_low_rank_hyperparameters",
    "low_rank_scaling",
    "low_rank_candidates",
    "find_low_rank_targets",
    "inject_low_rank",
    "wrap_layers",
    "low_rank_layers",
    "low_rank_parameter_names",
    "merge_low_rank",
    "unmerge_low_rank",
    "export_plain_model",
]
