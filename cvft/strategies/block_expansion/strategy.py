"""The ``block_expansion`` strategy: new identity-initialised blocks inside a frozen timm model (LLaMA-Pro style).

Block expansion (Wu et al., "LLaMA Pro: Progressive LLaMA with Block Expansion", 2024) adds capacity *inside* the
network: after some of its blocks it inserts a copy of that block whose residual branches start at zero, freezes
every original weight and trains only the copies (and the classifier head). The model computes exactly what it did
before set-up; the copies then learn the new task from the pretrained block's weights.

Where the copies go (at most one option; none means ``num_blocks=1``). Blocks are counted over the whole model in
forward order (``index``: a ViT's ``blocks.<i>``; a ResNet's ``layer1.0``, ``layer1.1``, ..., ``layer4.<last>``).
A block qualifies when its copy can start as the identity (every ViT block; CNN blocks that keep their input's shape,
see :mod:`cvft.strategies.block_expansion.blocks`):

* ``num_blocks=n``: spread evenly, as in the paper: the qualifying blocks are split into ``n`` equal groups and a copy
  follows the last block of each group (a 12-block ViT with ``n=4``: after blocks 2, 5, 8, 11);
* ``every=k``: after every ``k``-th qualifying block (the ``k``-th, ``2k``-th ...);
* ``after=[i, ...]``: after these block indices (negative: from the end);
* ``after_stages=[s, ...]``: after the last block of these stages (block containers in forward order: a ViT has
  one, ``blocks``; a ResNet four; negative: from the end).

BatchNorm. The original BatchNorm layers are frozen with the rest (``bn="frozen"``, the default: pretrained
statistics, eval mode). The inserted blocks of a CNN are fully trainable, so their BatchNorm layers run in train mode
and re-estimate their statistics on the new data, starting from the copied block's; the zero last BatchNorm keeps the
copy the identity in both modes, and adapter files carry those statistics. ``bn="train"`` also lets the original
layers' statistics follow the data (which changes the frozen network's function).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from cvft.errors import StrategyError
from cvft.strategies._freeze import require_head, set_trainable
from cvft.strategies.base import ParameterStrategy
from cvft.strategies.block_expansion.blocks import SUPPORTED_BLOCKS, BlockSite, find_block_sites
from cvft.strategies.block_expansion.expand import EXPANSION_ATTR, insert_identity_blocks
from cvft.strategies.registry import register_strategy

__all__ = ["BlockExpansion", "choose_sources"]

_OPTIONS = ("num_blocks", "every", "after", "after_stages")


def _positive(key: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise StrategyError(f"block_expansion: {key} must be a positive integer, got {value!r}.")
    return value


def _indices(key: str, value: object) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if (
        not isinstance(value, (list, tuple))
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise StrategyError(f"block_expansion: {key} must be a non-empty list of integers, got {value!r}.")
    return list(value)


def _listing(sites: Sequence[BlockSite]) -> str:
    return ", ".join(f"{s.index} ({s.name})" for s in sites) or "none"


def _qualifying(eligible: Sequence[BlockSite]) -> str:
    return (
        f"only {len(eligible)} blocks can be copied as the identity (block_expansion supports blocks that keep their "
        f"input's shape): {_listing(eligible)}"
    )


def _resolve(key: str, indices: Sequence[int], count: int, what: str) -> list[int]:
    resolved = [i + count if i < 0 else i for i in indices]
    bad = [i for i, r in zip(indices, resolved, strict=True) if not 0 <= r < count]
    if bad:
        raise StrategyError(
            f"block_expansion: {key}={list(indices)} names {what} {bad} that do not exist; the model has {count} "
            f"{what} (0..{count - 1}, or negative from the end)."
        )
    if len(set(resolved)) != len(resolved):
        raise StrategyError(f"block_expansion: {key}={list(indices)} names a {what[:-1]} twice; give each once.")
    return sorted(resolved)


def choose_sources(
    sites: Sequence[BlockSite],
    num_blocks: int | None = None,
    every: int | None = None,
    after: Sequence[int] | None = None,
    after_stages: Sequence[int] | None = None,
) -> list[BlockSite]:
    """The blocks to copy, for at most one of the placement options (none: ``num_blocks=1``) (see the module docstring).

    Raises:
        StrategyError: An index out of range or repeated, a block that cannot start as the identity, or more
            blocks asked for than qualify; the message lists the qualifying blocks.

    Example:
        >>> import timm
        >>> sites = find_block_sites(timm.create_model("test_vit"))
        >>> [s.index for s in choose_sources(sites, num_blocks=2)], [s.index for s in choose_sources(sites, every=4)]
        ([2, 5], [3])
        >>> [s.name for s in choose_sources(sites, after=[0, -1])]
        ['blocks.0', 'blocks.5']
    """
    eligible = [s for s in sites if s.eligible]
    if num_blocks is None and every is None and after is None and after_stages is None:
        num_blocks = 1
    if num_blocks is not None:
        if num_blocks > len(eligible):
            raise StrategyError(
                f"block_expansion: num_blocks={num_blocks}, but {_qualifying(eligible)}. Ask for at most "
                f"{len(eligible)} (one copy per block)."
            )
        return [eligible[(group * len(eligible)) // num_blocks - 1] for group in range(1, num_blocks + 1)]
    if every is not None:
        chosen = eligible[every - 1 :: every]
        if not chosen:
            raise StrategyError(
                f"block_expansion: every={every}, but {_qualifying(eligible)}; choose every <= {len(eligible)}."
            )
        return chosen
    if after is not None:
        chosen = [sites[i] for i in _resolve("after", after, len(sites), "blocks")]
    else:
        stages = sorted({s.stage_index for s in sites})
        wanted = _resolve("after_stages", after_stages or [], len(stages), "stages")
        chosen = [[s for s in sites if s.stage_index == stage][-1] for stage in wanted]
    refused = [s for s in chosen if not s.eligible]
    if refused:
        reasons = "; ".join(f"{s.index} ({s.name}): {s.reason}" for s in refused)
        raise StrategyError(
            f"block_expansion: cannot copy these blocks as the identity: {reasons}. Blocks that can (it supports "
            f"blocks that keep their input's shape): {_listing(eligible)}; pass their indices in `after`, or use "
            "num_blocks / every."
        )
    return chosen


@register_strategy
class BlockExpansion(ParameterStrategy):
    """Insert identity-initialised copies of blocks into a frozen timm model and train only them (and the head).

    Each copy is a deep copy of the block before it, with the output layers of its residual branches at zero (ViT:
    ``attn.proj`` and ``mlp.fc2``; ResNet: the last BatchNorm; ConvNeXt: ``mlp.fc2``), so the expanded model's output
    is exactly the original's before training. Blocks go into timm's own sequences (renumbered as in a deeper timm
    model), so ``forward_features`` and ``forward_intermediates`` keep working; a ViT's ``feature_info`` gains the
    new blocks. Adapter files hold the new blocks (and head); the same options re-create them on a fresh model.
    ``cvft export`` writes a state dict a deeper timm model loads (``depth`` / ``layers`` / ``depths``).
    Give at most one placement option; without any, ``num_blocks=1`` (one copy after the last qualifying block).

    Args:
        num_blocks: Number of copies, spread evenly over the qualifying blocks.
        every: One copy after every ``every``-th qualifying block.
        after: Indices of the blocks to copy, counted over the model's blocks in forward order.
        after_stages: Stages (block sequences in forward order) after whose last block a copy goes.
        train_head: Also train the classifier head.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_vit", num_classes=3).eval()
        >>> x = torch.randn(1, 3, 32, 32)
        >>> reference = model(x)
        >>> BlockExpansion(num_blocks=2).setup(model)
        >>> len(model.blocks), torch.equal(model(x), reference)
        (8, True)
        >>> sorted({n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad})
        ['blocks.3', 'blocks.7', 'head.bias', 'head.weight']
    """

    name = "block_expansion"

    def __init__(
        self,
        num_blocks: int | None = None,
        every: int | None = None,
        after: list[int] | None = None,
        after_stages: list[int] | None = None,
        train_head: bool = True,
    ) -> None:
        values = (num_blocks, every, after, after_stages)
        given = [key for key, value in zip(_OPTIONS, values, strict=True) if value is not None]
        if len(given) > 1:
            raise StrategyError(
                f"block_expansion: give at most one of {', '.join(_OPTIONS)}, got {', '.join(given)}; they are "
                "different ways to say where the new blocks go."
            )
        if not given:
            num_blocks = 1
        self.num_blocks = _positive("num_blocks", num_blocks) if num_blocks is not None else None
        self.every = _positive("every", every) if every is not None else None
        self.after = _indices("after", after) if after is not None else None
        self.after_stages = _indices("after_stages", after_stages) if after_stages is not None else None
        self.train_head = bool(train_head)

    def setup(self, model: nn.Module) -> None:
        """Insert the identity copies, freeze everything else, train the copies (and the head)."""
        if hasattr(model, EXPANSION_ATTR):
            raise StrategyError(
                f"block_expansion: {type(model).__name__} was already expanded; apply block_expansion once, to a "
                "fresh model."
            )
        head = require_head(model, self.name, self.train_head)
        sites = find_block_sites(model)
        if not any(site.eligible for site in sites):
            found = f" (its blocks: {'; '.join(f'{s.name}: {s.reason}' for s in sites)})" if sites else ""
            raise StrategyError(
                f"block_expansion: {type(model).__name__} has no block that can be copied as the identity{found}. "
                f"It supports {SUPPORTED_BLOCKS}; for other models add capacity on top with side_module "
                "(mode: top) instead."
            )
        sources = choose_sources(sites, self.num_blocks, self.every, self.after, self.after_stages)
        inserted = insert_identity_blocks(model, sources)
        prefixes = tuple(f"{name}." for name in inserted)
        new = {name for name, _ in model.named_parameters() if name.startswith(prefixes)}
        set_trainable(model, new | set(head))
        self.apply_bn_policy(model)
