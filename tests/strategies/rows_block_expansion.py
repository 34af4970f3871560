"""Matrix rows of block expansion (identity-initialised copies of blocks inserted into the frozen model).

Expected names and counts are written from the test models' architectures: ``test_vit`` has 6 blocks of width ``D``
and MLP width ``H`` (no LayerScale), so ``num_blocks=2`` copies blocks 2 and 5 into ``blocks.3`` and ``blocks.7``;
``test_resnet``'s only block that keeps its input's shape is ``layer1.0`` (a BasicBlock of ``C`` channels), so its
copy becomes ``layer1.1``.
"""

from __future__ import annotations

from matrix_kit import BASIC_BLOCK_PARAMS, VIT_BLOCK_PARAMS, injected_row
from strategy_testkit import fresh_model

_INSERTED = {"test_vit": ["blocks.3", "blocks.7"], "test_resnet": ["layer1.1"]}


def _spec(model_name: str) -> list[dict]:
    return [{"name": "block_expansion", "num_blocks": 2 if model_name == "test_vit" else 1}]


def _params(model_name, model):
    per_block = VIT_BLOCK_PARAMS if model_name == "test_vit" else BASIC_BLOCK_PARAMS
    return {f"{block}.{p}" for block in _INSERTED[model_name] for p in per_block}


def _count(model_name, model):
    """ViT block: 4D^2 + 2DH + 9D + H; BasicBlock of C channels: two 3x3 convs 18C^2, two BatchNorms 4C."""
    pristine = fresh_model(model_name)
    if model_name == "test_vit":
        D, H = pristine.embed_dim, pristine.blocks[0].mlp.fc1.out_features  # noqa: N806
        return len(_INSERTED[model_name]) * (4 * D * D + 2 * D * H + 9 * D + H)
    C = pristine.layer1[0].conv1.out_channels  # noqa: N806
    return 18 * C * C + 4 * C


ROWS = [injected_row("block_expansion", _spec, _params, _count)]
