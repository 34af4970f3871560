"""Side and top modules: expand a frozen backbone by a trainable block on its final features or a side network.

Importing this package registers ``"side_module"``.

Example:
    >>> from cvft.strategies import build_strategy
    >>> build_strategy({"name": "side_module", "mode": "side"}).mode
    'side'
"""

from cvft.strategies.side.layer import SideNetwork, TopBottleneck, TopTransformer
from cvft.strategies.side.strategy import SIDE_ATTR, FeatureLayout, SideModule, SideTuning

__all__ = ["SideTuning", "SideModule", "FeatureLayout", "SideNetwork", "TopBottleneck", "TopTransformer", "SIDE_ATTR"]
