"""Block expansion (LLaMA-Pro style): identity-initialised copies of blocks inserted into a frozen timm model.

Importing this package registers ``"block_expansion"``.

Example:
    >>> from cvft.strategies import build_strategy
    >>> build_strategy({"name": "block_expansion", "every": 3}).every
    3
"""

from cvft.strategies.block_expansion.blocks import BlockSite, find_block_sites, zero_residual_branches
from cvft.strategies.block_expansion.expand import (
    EXPANSION_ATTR,
    insert_identity_blocks,
    inserted_block_names,
    timm_depth_kwargs,
)
from cvft.strategies.block_expansion.strategy import BlockExpansion, choose_sources

__all__ = [
    "BlockExpansion",
    "BlockSite",
    "EXPANSION_ATTR",
    "choose_sources",
    "find_block_sites",
    "insert_identity_blocks",
    "inserted_block_names",
    "timm_depth_kwargs",
    "zero_residual_branches",
]
