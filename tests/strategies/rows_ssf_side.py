"""Matrix rows of SSF, side/top modules and shared LoRA.

Expected names and counts are written from the test models' architectures (module names of a fresh timm model,
``embed_dim``, MLP width, channels), never from the strategies' own parameters.
"""

from __future__ import annotations

import re

from matrix_kit import BASIC_BLOCK_PARAMS, RESNET_BLOCK_CONV, VIT_BLOCK_PARAMS, injected_row
from strategy_testkit import fresh_model
from torch import nn

from cvft.strategies.lowrank import merge_low_rank
from cvft.strategies.ssf import fold_ssf

SIDE_WIDTH, SIDE_STAGES, TOP_REDUCTION = 8, 2, 4
SHARED_RANK = 4


def _vit_sizes(model: nn.Module) -> tuple[int, int, int]:
    """``(D, H, L)``: embed dim, MLP hidden width, depth, from the hyper-parameters of a fresh model."""
    pristine = fresh_model("test_vit")
    return pristine.embed_dim, pristine.blocks[0].mlp.fc1.out_features, len(pristine.blocks)


# --------------------------------------------------------------------------- ssf
def _ssf_followed(model_name: str) -> list[str]:
    """Layers SSF follows by default: the paper's ViT placement, every conv and BatchNorm of the ResNet."""
    if model_name == "test_vit":
        L = len(fresh_model(model_name).blocks)  # noqa: N806
        per_block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
        return ["patch_embed.proj", *[f"blocks.{i}.{p}" for i in range(L) for p in per_block], "norm"]
    pristine = fresh_model(model_name)
    return [n for n, m in pristine.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]


def _ssf_params(model_name, model):
    return {f"{layer}.{p}" for layer in _ssf_followed(model_name) for p in ("ssf_scale", "ssf_shift")}


def _ssf_count(model_name, model):
    """Closed form: 2 per output channel of every followed layer (7D + H per ViT block, D for patch embed and norm)."""
    if model_name == "test_vit":
        D, H, L = _vit_sizes(model)  # noqa: N806
        return 2 * (D + L * (7 * D + H) + D)
    pristine = fresh_model(model_name)
    convs = sum(m.out_channels for m in pristine.modules() if isinstance(m, nn.Conv2d))
    bns = sum(m.num_features for m in pristine.modules() if isinstance(m, nn.BatchNorm2d))
    return 2 * (convs + bns)


# --------------------------------------------------------------------------- side_module
def _top_spec(model_name: str) -> list[dict]:
    return [{"name": "side_module", "mode": "top", "depth": 1, "reduction": TOP_REDUCTION}]


def _side_spec(model_name: str) -> list[dict]:
    return [{"name": "side_module", "mode": "side", "side_width": SIDE_WIDTH, "side_stages": SIDE_STAGES}]


#: The top module's block: test_vit's with LayerScale, or a ResNet Bottleneck.
_TOP_VIT_BLOCK = [*VIT_BLOCK_PARAMS, "ls1.gamma", "ls2.gamma"]
_TOP_BOTTLENECK = [*BASIC_BLOCK_PARAMS, "conv3.weight", "bn3.weight", "bn3.bias"]


def _top_params(model_name, model):
    names = _TOP_VIT_BLOCK if model_name == "test_vit" else _TOP_BOTTLENECK
    return {f"side_module.net.0.{p}" for p in names}


def _top_count(model_name, model):
    """ViT block with LayerScale: 4D^2 + 2DH + 11D + H; bottleneck (h = C/4): 2Ch + 9h^2 + 4h + 2C."""
    if model_name == "test_vit":
        D, H, _ = _vit_sizes(model)  # noqa: N806
        return 4 * D * D + 2 * D * H + 11 * D + H
    C = model.num_features  # noqa: N806
    h = C // TOP_REDUCTION
    return 2 * C * h + 9 * h * h + 4 * h + 2 * C


def _side_params(model_name, model):
    convs = {f"side_module.net.body.{3 * i}.weight" for i in range(SIDE_STAGES)}
    bns = {f"side_module.net.body.{3 * i + 1}.{p}" for i in range(SIDE_STAGES) for p in ("weight", "bias")}
    return convs | bns | {"side_module.net.proj.weight", "side_module.net.proj.bias", "side_module.net.gate"}


def _side_count(model_name, model):
    """Stages: 9 c_in c_out + 2 c_out each (widths w, 2w, ...); projection (last width + 1) * C; the gate."""
    channels = model.embed_dim if model_name == "test_vit" else model.num_features
    widths = [3] + [SIDE_WIDTH * 2**i for i in range(SIDE_STAGES)]
    stages = sum(9 * c_in * c_out + 2 * c_out for c_in, c_out in zip(widths, widths[1:], strict=False))
    return stages + (widths[-1] + 1) * channels + 1


# --------------------------------------------------------------------------- shared_lora
def _shared_spec(model_name: str) -> list[dict]:
    targets = "vit_attention" if model_name == "test_vit" else "resnet_blocks"
    return [{"name": "shared_lora", "rank": SHARED_RANK, "alpha": 8, "targets": targets}]


def _shared_layers(model_name: str) -> dict[str, tuple[int, ...]]:
    """Adapted layer -> weight shape, in model order, from a fresh model."""
    pristine = fresh_model(model_name)
    pattern = re.compile(r"blocks\.\d+\.attn\.(qkv|proj)") if model_name == "test_vit" else RESNET_BLOCK_CONV
    return {n: tuple(m.weight.shape) for n, m in pristine.named_modules() if pattern.fullmatch(n)}


def _shared_params(model_name, model):
    layers = _shared_layers(model_name)
    first_of_shape: dict[tuple[int, ...], str] = {}
    for name, shape in layers.items():
        first_of_shape.setdefault(shape, name)
    shared = {f"{name}.shared.{f}" for name in first_of_shape.values() for f in ("lora_A", "lora_B")}
    return shared | {f"{name}.lora_scale" for name in layers}


def _shared_count(model_name, model):
    """Closed form: r * (in_flat + out) per distinct weight shape, plus one scale per adapted layer."""
    layers = _shared_layers(model_name)
    shapes = set(layers.values())
    per_shape = sum(SHARED_RANK * (shape[0] + _prod(shape[1:])) for shape in shapes)
    return per_shape + len(layers)


def _prod(values) -> int:
    result = 1
    for value in values:
        result *= value
    return result


ROWS = [
    injected_row("ssf", [{"name": "ssf"}], _ssf_params, _ssf_count, merge=fold_ssf, lr=3e-2),
    injected_row("side_module-top", _top_spec, _top_params, _top_count),
    injected_row("side_module-side", _side_spec, _side_params, _side_count),
    injected_row("shared_lora", _shared_spec, _shared_params, _shared_count, merge=merge_low_rank, lr=3e-2),
]
