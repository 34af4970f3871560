"""Matrix rows of the bottleneck adapters: ``conv_adapter``, ``vit_adapter`` and ``shared_adapter``.

Expected names and closed-form sizes come from the test models' architectures, written out by hand here: timm's
``test_resnet`` has one block per stage, ``test_vit`` has ``depth`` blocks of width ``embed_dim``.
"""

from __future__ import annotations

from matrix_kit import injected_row
from strategy_testkit import MODELS

#: test_resnet's blocks: (input channels, output channels), read off timm's definition.
RESNET_BLOCKS = {"layer1.0": (32, 32), "layer2.0": (32, 48), "layer3.0": (48, 192), "layer4.0": (192, 96)}
#: Its spatial (3x3) convolutions inside the blocks: (in, out); BasicBlocks have two, the Bottleneck one.
RESNET_3X3 = {
    "layer1.0.conv1": (32, 32),
    "layer1.0.conv2": (32, 32),
    "layer2.0.conv1": (32, 48),
    "layer2.0.conv2": (48, 48),
    "layer3.0.conv2": (48, 48),
    "layer4.0.conv1": (192, 96),
    "layer4.0.conv2": (96, 96),
}
REDUCTION = 4
VIT_WIDTH = 8
BOTTLENECK = ("adapter.down.weight", "adapter.down.bias", "adapter.up.weight", "adapter.up.bias")


def _bottleneck(c_in: int, c_out: int, width: int) -> int:
    """down (c_in -> width, with bias) and up (width -> c_out, with bias)."""
    return c_in * width + width + width * c_out + c_out


def _names(prefixes, suffixes) -> set[str]:
    return {f"{prefix}.{suffix}" for prefix in prefixes for suffix in suffixes}


# ----------------------------------------------------------------------------------------------- conv_adapter
PARALLEL_BLOCK = {"name": "conv_adapter", "placement": "parallel_block", "kind": "pointwise", "reduction": REDUCTION}
PARALLEL_CONV = {"name": "conv_adapter", "placement": "parallel_conv", "kind": "depthwise", "reduction": REDUCTION}
SEQUENTIAL = {
    "name": "conv_adapter",
    "placement": "sequential",
    "kind": "depthwise",
    "reduction": REDUCTION,
    "scale": "scalar",
}


def _parallel_block_count(name, model):
    """Per block: a 1x1 bottleneck c_in -> c_in // 4 -> c_out, plus a per-channel scale of c_out."""
    return sum(_bottleneck(i, o, i // REDUCTION) + o for i, o in RESNET_BLOCKS.values())


def _parallel_conv_count(name, model):
    """Per 3x3 conv: depthwise 3x3 on c_in (no bias), bottleneck c_in -> c_in // 4 -> c_out, per-channel scale."""
    return sum(i * 9 + _bottleneck(i, o, i // REDUCTION) + o for i, o in RESNET_3X3.values())


def _sequential_count(name, model):
    """Per block: depthwise 3x3 on c_out, bottleneck c_out -> c_out // 4 -> c_out, one scalar scale."""
    return sum(o * 9 + _bottleneck(o, o, o // REDUCTION) + 1 for _, o in RESNET_BLOCKS.values())


def _parallel_block_params(name, model):
    return _names(RESNET_BLOCKS, (*BOTTLENECK, "scale"))


def _parallel_conv_params(name, model):
    return _names(RESNET_3X3, (*BOTTLENECK, "adapter.depthwise.weight", "scale"))


def _sequential_params(name, model):
    return _names(RESNET_BLOCKS, (*BOTTLENECK, "adapter.depthwise.weight", "scale"))


# ----------------------------------------------------------------------------------------------- vit_adapter
HOULSBY = {"name": "vit_adapter", "style": "houlsby", "width": VIT_WIDTH}
ADAPTFORMER = {"name": "vit_adapter", "style": "adaptformer", "width": VIT_WIDTH, "learnable_scale": True}


def _houlsby_count(name, model):
    """Two adapters (after attn, after mlp) of D -> 8 -> D per block; the scale is the fixed 1."""
    D = model.embed_dim  # noqa: N806
    return len(model.blocks) * 2 * _bottleneck(D, D, VIT_WIDTH)


def _houlsby_params(name, model):
    return _names([f"blocks.{i}.{p}" for i in range(len(model.blocks)) for p in ("attn", "mlp")], BOTTLENECK)


def _adaptformer_count(name, model):
    """One parallel adapter D -> 8 -> D beside each block's MLP, plus its learned scalar scale."""
    D = model.embed_dim  # noqa: N806
    return len(model.blocks) * (_bottleneck(D, D, VIT_WIDTH) + 1)


def _adaptformer_params(name, model):
    return _names([f"blocks.{i}.mlp" for i in range(len(model.blocks))], (*BOTTLENECK, "scale"))


# ----------------------------------------------------------------------------------------------- shared_adapter
SHARED = {"name": "shared_adapter", "reduction": REDUCTION}


def _shared_count(name, model):
    """ViT: one D -> D // 4 -> D bottleneck for 2 * depth positions + one scalar each. ResNet: one 1x1 bottleneck per
    distinct block output width (all four differ in test_resnet) + one scalar per block."""
    if name == "test_vit":
        D = model.embed_dim  # noqa: N806
        return _bottleneck(D, D, D // REDUCTION) + 2 * len(model.blocks)
    widths = {o for _, o in RESNET_BLOCKS.values()}
    return sum(_bottleneck(o, o, o // REDUCTION) for o in widths) + len(RESNET_BLOCKS)


def _shared_params(name, model):
    if name == "test_vit":
        positions = [f"blocks.{i}.{p}" for i in range(len(model.blocks)) for p in ("attn", "mlp")]
        # the shared tensors are listed once, under the first position that uses them
        return _names(["blocks.0.attn"], BOTTLENECK) | _names(positions, ["scale"])
    return _names(RESNET_BLOCKS, (*BOTTLENECK, "scale"))


# (id, spec, injected parameters, their closed-form count, models): every row trains them and the head, at lr 3e-2.
RESNET, VIT = ("test_resnet",), ("test_vit",)
ROWS = [
    injected_row(row_id, [spec], params, count, models=models, lr=3e-2)
    for row_id, spec, params, count, models in [
        ("conv_adapter-parallel_block", PARALLEL_BLOCK, _parallel_block_params, _parallel_block_count, RESNET),
        ("conv_adapter-parallel_conv", PARALLEL_CONV, _parallel_conv_params, _parallel_conv_count, RESNET),
        ("conv_adapter-sequential", SEQUENTIAL, _sequential_params, _sequential_count, RESNET),
        ("vit_adapter-houlsby", HOULSBY, _houlsby_params, _houlsby_count, VIT),
        ("vit_adapter-adaptformer", ADAPTFORMER, _adaptformer_params, _adaptformer_count, VIT),
        ("shared_adapter", SHARED, _shared_params, _shared_count, tuple(MODELS)),
    ]
]
