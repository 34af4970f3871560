"""Matrix rows of block expansion (identity-initialised copies of blocks inserted into the frozen model).

Expected names and counts are written from the test models' architectures: ``test_vit`` has 6 blocks of width ``D``
and MLP width ``H`` (no LayerScale), so ``num_blocks=2`` copies blocks 2 and 5 into ``blocks.3`` and ``blocks.7``;
``test_resnet``'s only block that keeps its input's shape is ``layer1.0`` (a BasicBlock of ``C`` channels), so its
copy becomes ``layer1.1``.
"""

from __future__ import annotations

import timm
from matrix_kit import Row, _head, _union
from strategy_testkit import IMAGE_SIZE
from torch import nn

_INSERTED = {"test_vit": ["blocks.3", "blocks.7"], "test_resnet": ["layer1.1"]}
_VIT_BLOCK = [
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
]
_BASIC_BLOCK = ["conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight", "bn2.weight", "bn2.bias"]


def _pristine(model_name: str) -> nn.Module:
    kwargs = {"img_size": IMAGE_SIZE} if model_name == "test_vit" else {}
    return timm.create_model(model_name, pretrained=False, **kwargs)


def _spec(model_name: str) -> list[dict]:
    return [{"name": "block_expansion", "num_blocks": 2 if model_name == "test_vit" else 1}]


def _params(model_name, model):
    per_block = _VIT_BLOCK if model_name == "test_vit" else _BASIC_BLOCK
    return {f"{block}.{p}" for block in _INSERTED[model_name] for p in per_block}


def _count(model_name, model):
    """ViT block: 4D^2 + 2DH + 9D + H; BasicBlock of C channels: two 3x3 convs 18C^2, two BatchNorms 4C."""
    pristine = _pristine(model_name)
    if model_name == "test_vit":
        D, H = pristine.embed_dim, pristine.blocks[0].mlp.fc1.out_features  # noqa: N806
        return len(_INSERTED[model_name]) * (4 * D * D + 2 * D * H + 9 * D + H)
    C = pristine.layer1[0].conv1.out_channels  # noqa: N806
    return 18 * C * C + 4 * C


ROWS = [
    Row(
        "block_expansion",
        _spec("test_vit"),
        _union(_head, _params),
        lambda d: d.head + d.injected,
        injected=_count,
        specs_for=_spec,
    ),
]
