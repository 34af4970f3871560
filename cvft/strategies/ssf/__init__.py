"""SSF (scale and shift features): the wrapper, target selection, folding and the registered ``ssf`` strategy.

Importing this package registers ``"ssf"``.

Example:
    >>> from cvft.strategies import build_strategy
    >>> build_strategy({"name": "ssf", "targets": "norms"}).targets
    'norms'
"""

from cvft.strategies.ssf.layer import SSFLayer, is_ssf_supported, ssf_channel_dim
from cvft.strategies.ssf.strategy import SSF, find_ssf_targets, fold_ssf, inject_ssf, ssf_candidates, ssf_layers

__all__ = [
    "SSF",
    "SSFLayer",
    "is_ssf_supported",
    "ssf_channel_dim",
    "ssf_candidates",
    "find_ssf_targets",
    "inject_ssf",
    "ssf_layers",
    "fold_ssf",
]
