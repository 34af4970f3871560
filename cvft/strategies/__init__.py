"""Fine-tuning strategies: one interface, a registry of names, usable in cvft modules, as a callback or on a module.

Example:
    >>> from cvft.strategies import available_strategies
    >>> {"full", "linear_probe", "gradual_unfreeze", "layerwise_lr"} <= set(available_strategies())
    True
"""

from cvft._deprecation import moved_names
from cvft.strategies import freezing as _freezing
from cvft.strategies.adapters import ConvAdapter, SharedAdapter, ViTAdapter, remove_adapters
from cvft.strategies.apply import apply_strategies
from cvft.strategies.base import ParameterStrategy, Strategy, StrategyStack
from cvft.strategies.block_expansion import BlockExpansion
from cvft.strategies.callback import StrategyCallback
from cvft.strategies.continual import EWC, L2SP, ContinualStrategy, LwF, MultiHeadNet
from cvft.strategies.contrastive import SupCon, supcon_loss
from cvft.strategies.distillation import Distillation, feature_distillation_loss, kd_loss
from cvft.strategies.domain import AdaBN, AdaBNCallback, PseudoLabel, adabn
from cvft.strategies.filter_select import FilterSelect, merge_filter_select
from cvft.strategies.freezing import (  # the package exports all of _freezing.__all__
    BitFit,
    ClassifierOnly,
    EmbeddingOnly,
    FreezeLayers,
    FreezingStrategy,
    FullFineTune,
    LinearProbe,
    NormOnly,
)
from cvft.strategies.gradual_unfreeze import GradualUnfreeze
from cvft.strategies.headless import setup_headless
from cvft.strategies.layerwise_lr import LayerwiseLRDecay
from cvft.strategies.loha import LoHA
from cvft.strategies.lokr import LoKr
from cvft.strategies.lora import LoRA, export_plain_model, merge_lora, unmerge_lora
from cvft.strategies.param_groups import add_param_groups, build_param_groups, no_weight_decay_names
from cvft.strategies.preference import DPO, PPO, TRPO, Reinforce, RewardModel
from cvft.strategies.prompts import VPT, PrefixTuning, fold_prefix
from cvft.strategies.qat import QAT, convert_qat
from cvft.strategies.qlora import QLoRA
from cvft.strategies.registry import (
    StrategySpec,
    available_strategies,
    build_strategies,
    build_strategy,
    get_strategy,
    register_strategy,
)
from cvft.strategies.shared_lora import SharedLoRA
from cvft.strategies.side import SideTuning
from cvft.strategies.sparse import SparseFineTune, merge_sparse
from cvft.strategies.ssf import SSF, fold_ssf
from cvft.strategies.support import TaskSupport, check_supported

__all__ = [
    "setup_headless",
    "AdaBN",
    "AdaBNCallback",
    "PseudoLabel",
    "adabn",
    "EWC",
    "L2SP",
    "LwF",
    "ContinualStrategy",
    "MultiHeadNet",
    "VPT",
    "PrefixTuning",
    "fold_prefix",
    "SSF",
    "fold_ssf",
    "SideTuning",
    "BlockExpansion",
    "SharedLoRA",
    "Strategy",
    "ParameterStrategy",
    "StrategyStack",
    "StrategySpec",
    "StrategyCallback",
    "TaskSupport",
    "check_supported",
    "apply_strategies",
    "register_strategy",
    "get_strategy",
    "build_strategy",
    "build_strategies",
    "available_strategies",
    "build_param_groups",
    "add_param_groups",
    "no_weight_decay_names",
    *_freezing.__all__,
    "GradualUnfreeze",
    "LayerwiseLRDecay",
    "LoRA",
    "LoHA",
    "LoKr",
    "merge_lora",
    "unmerge_lora",
    "QLoRA",
    "QAT",
    "convert_qat",
    "export_plain_model",
    "SparseFineTune",
    "merge_sparse",
    "FilterSelect",
    "merge_filter_select",
    "ConvAdapter",
    "ViTAdapter",
    "SharedAdapter",
    "remove_adapters",
    "SupCon",
    "supcon_loss",
    "Distillation",
    "kd_loss",
    "feature_distillation_loss",
    "Reinforce",
    "PPO",
    "TRPO",
    "DPO",
    "RewardModel",
]

#: Moved out of strategies (it builds tasks and exports): deprecated aliases.
__getattr__ = moved_names(__name__, {"linear_probe_after_contrastive": "cvft.workflows"})
