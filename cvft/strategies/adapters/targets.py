"""Finding where adapters go: transformer blocks of ViT-family models, residual blocks and convolutions of CNNs.

* A *transformer block* is any module with an ``attn`` and an ``mlp`` sub-module (timm's ``Block``, ``EvaBlock``,
  Swin blocks ...); nested ones inside another are not counted twice.
* A *convolutional block* is a module named by the fine-grained ``blocks`` rules of timm's
  ``model.group_matcher(coarse=False)`` (``layerN.M`` in ResNets, ``stages.N.blocks.M`` in ConvNeXt,
  ``blocks.N.M`` in EfficientNet/MobileNet), leaving out the rules with a fixed group (ConvNeXt's
  ``stages.N.downsample``, ``conv_head``). The channels and stride of each block are measured with one small
  forward pass (:func:`probe_feature_maps`), so downsampling blocks need no per-architecture code.
"""

from __future__ import annotations

import torch
from torch import nn

from cvft.errors import StrategyError
from cvft.strategies.selectors import block_patterns

__all__ = ["FeatureMap", "conv_blocks", "probe_feature_maps", "spatial_convs", "transformer_blocks"]

PROBE_SIZE = 64
#: Shapes ``(channels, height, width)`` of a block's input and output, as measured by a probe forward pass.
FeatureMap = tuple[tuple[int, int, int], tuple[int, int, int]]


def _outermost(names: list[str]) -> list[str]:
    kept: list[str] = []
    for name in names:  # model order: a parent comes before its children
        if not any(name.startswith(parent + ".") for parent in kept):
            kept.append(name)
    return kept


def transformer_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Modules with both an ``attn`` and an ``mlp`` sub-module, outermost only, in model order.

    Example:
        >>> import timm
        >>> list(transformer_blocks(timm.create_model("test_vit")))[:2]
        ['blocks.0', 'blocks.1']
        >>> transformer_blocks(timm.create_model("test_resnet"))
        {}
    """
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(getattr(module, "attn", None), nn.Module) and isinstance(getattr(module, "mlp", None), nn.Module)
    ]
    return {name: model.get_submodule(name) for name in _outermost(found)}


def conv_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The numbered blocks of a timm CNN, from its fine-grained ``group_matcher`` rules, in model order.

    Raises:
        StrategyError: The model is a ViT-family model or has no block rules.

    Example:
        >>> import timm
        >>> list(conv_blocks(timm.create_model("test_resnet")))
        ['layer1.0', 'layer2.0', 'layer3.0', 'layer4.0']
        >>> list(conv_blocks(timm.create_model("convnext_atto")))[:3]
        ['stages.0.blocks.0', 'stages.0.blocks.1', 'stages.1.blocks.0']
    """
    patterns = block_patterns(model) or []
    found = [name for name, _ in model.named_modules() if name and any(p.fullmatch(name) for p in patterns)]
    if not found:
        raise StrategyError(
            f"Found no convolutional blocks in {type(model).__name__}: it needs timm's group_matcher with numbered "
            "block rules (ResNet layerN.M, ConvNeXt stages.N.blocks.M, EfficientNet blocks.N.M ...)."
        )
    return {name: model.get_submodule(name) for name in _outermost(found)}


def probe_feature_maps(
    model: nn.Module, modules: dict[str, nn.Module], size: int = PROBE_SIZE
) -> dict[str, FeatureMap]:
    """Input and output ``(C, H, W)`` of each module, from one eval-mode forward pass of a ``size`` x ``size`` image.

    Training flags are restored afterwards and BatchNorm statistics do not move (eval mode, no gradients).

    Raises:
        StrategyError: A module's input or output is not a 4-D feature map (``N, C, H, W``).

    Example:
        >>> import timm
        >>> model = timm.create_model("test_resnet")
        >>> probe_feature_maps(model, {"layer2.0": model.layer2[0]})
        {'layer2.0': ((32, 16, 16), (48, 8, 8))}
    """
    shapes: dict[str, FeatureMap] = {}
    names = {id(module): name for name, module in modules.items()}

    def record(module: nn.Module, args: tuple, output) -> None:
        x, y = args[0] if args else None, output[0] if isinstance(output, (tuple, list)) else output
        name = names[id(module)]
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dim() == 4 and y.dim() == 4):
            raise StrategyError(
                f"Module {name} ({type(module).__name__}) does not map 4-D feature maps to 4-D feature maps; "
                "convolutional adapters need NCHW blocks (for ViT-family models use vit_adapter)."
            )
        shapes[name] = (tuple(x.shape[1:]), tuple(y.shape[1:]))

    param = next(model.parameters())
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    in_chans = first_conv.in_channels if first_conv is not None else 3
    image = torch.zeros(1, in_chans, size, size, device=param.device, dtype=param.dtype)
    modes = {module: module.training for module in model.modules()}
    handles = [module.register_forward_hook(record) for module in modules.values()]
    try:
        model.eval()
        with torch.no_grad():
            forward = getattr(model, "forward_features", model)
            forward(image)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    unused = [name for name in modules if name not in shapes]
    if unused:
        raise StrategyError(f"Blocks {unused[:3]} take no part in {type(model).__name__}'s forward pass.")
    return shapes


def spatial_convs(block: nn.Module) -> dict[str, nn.Conv2d]:
    """The convolutions with a kernel larger than 1x1 inside ``block`` (3x3 and depthwise convs), by relative name.

    Example:
        >>> import timm
        >>> list(spatial_convs(timm.create_model("test_resnet").layer3[0]))
        ['conv2']
    """
    return {
        name: module
        for name, module in block.named_modules()
        if isinstance(module, nn.Conv2d) and max(module.kernel_size) > 1
    }
