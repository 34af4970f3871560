"""Which timm blocks ``block_expansion`` can copy as the identity, where they sit, and how to zero their branch.

A copy of a residual block computes the identity when its residual branch adds zero and its shortcut is the identity.
Each supported block says how (the output layers of every residual branch, weights and biases set to zero):

* timm ViT ``Block`` (``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``): ``attn.proj`` and ``mlp.fc2``, as in
  LLaMA-Pro (Wu et al., 2024). LayerScale, if any, then scales zero. The shortcut is always the identity.
* ResNet ``BasicBlock`` / ``Bottleneck``: the last BatchNorm (``bn2`` / ``bn3``), in train and eval mode alike.
  Only blocks without ``downsample`` (same channels, stride 1) qualify; the ReLU after the sum then gives back its
  input, which is the (non-negative) output of the block the copy was taken from.
* ``ConvNeXtBlock``: ``mlp.fc2`` (the last pointwise layer; a Linear, or a 1x1 conv with ``conv_mlp``), so the
  layer-scale ``gamma`` keeps its pretrained value. Only blocks with an identity ``shortcut`` and stride 1 qualify.
* EfficientNet / MobileNet ``InvertedResidual`` and ``DepthwiseSeparableConv``: the BatchNorm after the last
  pointwise conv (``bn3`` / ``bn2``, which has no activation). Only blocks with a skip (``has_skip``: same channels,
  stride 1) qualify; nothing follows the sum.

Blocks are found as the children of ``nn.Sequential`` containers whose children are all supported blocks (a ViT's
``blocks``, a ResNet's ``layer1``..``layer4``, a ConvNeXt's ``stages.<i>.blocks``), in forward order. Only these exact
classes are accepted: subclasses may compute something else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cvft.errors import StrategyError

__all__ = ["BlockSite", "find_block_sites", "identity_layers", "zero_residual_branches", "SUPPORTED_BLOCKS"]

#: What the strategy supports, for error messages.
SUPPORTED_BLOCKS = (
    "timm ViTs (vision_transformer.Block), ResNets (BasicBlock, Bottleneck), ConvNeXts (ConvNeXtBlock) and "
    "EfficientNets / MobileNets (InvertedResidual, DepthwiseSeparableConv)"
)


@dataclass(frozen=True)
class BlockSite:
    """One original block: its container (a stage), its position there and in the whole model.

    Attributes:
        stage: Module name of the ``nn.Sequential`` holding the block (``"blocks"``, ``"layer2"``).
        stage_index: Index of that container among the model's block containers, in forward order.
        position: Index of the block inside its container.
        index: Index of the block among all the model's blocks, in forward order (what ``after`` counts).
        eligible: Whether a copy of the block can start as the identity (see :func:`identity_layers`).
        reason: Why not, when not eligible.
    """

    stage: str
    stage_index: int
    position: int
    index: int
    eligible: bool
    reason: str = ""

    @property
    def name(self) -> str:
        """Module name of the block (``"layer2.1"``)."""
        return f"{self.stage}.{self.position}"


def _block_classes() -> tuple[type[nn.Module], ...]:
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
    from timm.models.convnext import ConvNeXtBlock
    from timm.models.resnet import BasicBlock, Bottleneck
    from timm.models.vision_transformer import Block

    return Block, BasicBlock, Bottleneck, ConvNeXtBlock, InvertedResidual, DepthwiseSeparableConv


def _is_supported(module: nn.Module) -> bool:
    return type(module) in _block_classes()


def identity_layers(block: nn.Module) -> tuple[list[nn.Module], str]:
    """The layers whose weights and biases, set to zero, make a copy of ``block`` the identity.

    Returns:
        ``(layers, reason)``: the layers, or an empty list and the reason the block cannot become the identity.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_resnet")
        >>> [type(m).__name__ for m in identity_layers(model.layer1[0])[0]]
        ['BatchNorm2d']
        >>> identity_layers(model.layer2[0])[1]
        'it changes the shape (downsample shortcut)'
    """
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
    from timm.models.convnext import ConvNeXtBlock
    from timm.models.resnet import BasicBlock, Bottleneck
    from timm.models.vision_transformer import Block

    kind = type(block)
    if kind is Block:
        layers = [getattr(block.attn, "proj", None), getattr(block.mlp, "fc2", None)]
        wanted: tuple[type[nn.Module], ...] = (nn.Linear,)
    elif kind in (BasicBlock, Bottleneck):
        if block.downsample is not None:
            return [], "it changes the shape (downsample shortcut)"
        last_act = block.act2 if kind is BasicBlock else block.act3
        if not isinstance(last_act, (nn.ReLU, nn.ReLU6)):
            return [], f"its activation after the sum ({type(last_act).__name__}) is not idempotent like ReLU"
        layers = [block.bn2 if kind is BasicBlock else block.bn3]
        wanted = (nn.BatchNorm2d,)
    elif kind is ConvNeXtBlock:
        if not isinstance(block.shortcut, nn.Identity) or tuple(block.conv_dw.stride) != (1, 1):
            return [], "its shortcut is not the identity (channels or stride change)"
        layers = [getattr(block.mlp, "fc2", None)]
        wanted = (nn.Linear, nn.Conv2d)
    elif kind in (InvertedResidual, DepthwiseSeparableConv):
        if not block.has_skip:
            return [], "it has no identity shortcut (channels or stride change)"
        last_norm = block.bn3 if kind is InvertedResidual else block.bn2
        if not isinstance(getattr(last_norm, "act", nn.Identity()), nn.Identity):
            return [], f"its last BatchNorm is followed by an activation ({type(last_norm.act).__name__})"
        layers = [last_norm]
        wanted = (nn.BatchNorm2d,)
    else:
        return [], f"{kind.__name__} is not a supported block"
    if not all(isinstance(layer, wanted) and getattr(layer, "bias", None) is not None for layer in layers):
        return [], (
            "its output layers are not plain layers with a bias (another strategy wrapped them? apply "
            "block_expansion first)"
        )
    return layers, ""


def zero_residual_branches(block: nn.Module) -> None:
    """Zero the output layers of every residual branch of ``block`` (in place), so that it computes the identity.

    Raises:
        StrategyError: ``block`` cannot become the identity (see :func:`identity_layers`).

    Example:
        >>> import copy, timm, torch
        >>> model = timm.create_model("test_vit").eval()
        >>> block = copy.deepcopy(model.blocks[0])
        >>> zero_residual_branches(block)
        >>> tokens = torch.randn(1, 5, 64)
        >>> torch.equal(block(tokens), tokens)
        True
    """
    layers, reason = identity_layers(block)
    if not layers:
        raise StrategyError(f"block_expansion: a {type(block).__name__} cannot start as the identity: {reason}.")
    with torch.no_grad():
        for layer in layers:
            layer.weight.zero_()
            layer.bias.zero_()


def find_block_sites(model: nn.Module) -> list[BlockSite]:
    """Every supported block of ``model`` in forward order, with whether a copy of it can start as the identity.

    Example:
        >>> import timm
        >>> sites = find_block_sites(timm.create_model("test_resnet"))
        >>> [(s.name, s.eligible) for s in sites]
        [('layer1.0', True), ('layer2.0', False), ('layer3.0', False), ('layer4.0', False)]
    """
    sites: list[BlockSite] = []
    stage_index = 0
    for stage_name, module in model.named_modules():
        if not isinstance(module, nn.Sequential) or len(module) == 0:
            continue
        if not all(_is_supported(child) for child in module):
            continue
        for position, block in enumerate(module):
            layers, reason = identity_layers(block)
            sites.append(BlockSite(stage_name, stage_index, position, len(sites), bool(layers), reason))
        stage_index += 1
    return sites
