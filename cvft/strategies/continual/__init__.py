"""Continual fine-tuning without forgetting: L2-SP, EWC and LwF objectives and a multi-head model.

Run a sequence of tasks with :func:`cvft.continual.run_continual`.

Example:
    >>> from cvft.strategies import build_strategy
    >>> build_strategy({"name": "ewc", "lam": 10.0})
    EWC(lam=10.0, fisher_batches=8, fisher='sampled', gamma=1.0, seed=0)
"""

from cvft.strategies.continual.base import ContinualStrategy
from cvft.strategies.continual.lwf import LwF, distillation_loss
from cvft.strategies.continual.multihead import MultiHeadNet, active_head_parameter_names, is_multi_head
from cvft.strategies.continual.regularizers import EWC, L2SP, diagonal_fisher

__all__ = [
    "ContinualStrategy",
    "EWC",
    "L2SP",
    "LwF",
    "MultiHeadNet",
    "active_head_parameter_names",
    "diagonal_fisher",
    "distillation_loss",
    "is_multi_head",
]
