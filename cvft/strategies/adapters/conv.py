"""``conv_adapter``: Conv-Adapter (Chen et al., 2022) bottlenecks beside or after the blocks of a timm CNN."""

from __future__ import annotations

from torch import nn

from cvft.errors import StrategyError
from cvft.strategies.adapters.layer import ConvBottleneck, ParallelAdapter, SequentialAdapter, bottleneck_width
from cvft.strategies.adapters.strategy import BottleneckAdapterStrategy, check_positive_int
from cvft.strategies.adapters.targets import conv_blocks, probe_feature_maps, spatial_convs
from cvft.strategies.registry import register_strategy

__all__ = ["ConvAdapter", "PLACEMENTS", "KINDS", "SCALES"]

PLACEMENTS = ("parallel_block", "parallel_conv", "sequential")
KINDS = ("depthwise", "pointwise")
SCALES = ("channel", "scalar")


def _stride(name: str, size_in: int, size_out: int) -> int:
    stride = max(1, round(size_in / size_out))
    if -(-size_in // stride) != size_out:
        raise StrategyError(
            f"conv_adapter: block {name} maps a {size_in}-pixel side to {size_out}, which no integer stride gives; "
            "use placement='parallel_conv' or 'sequential' for this model."
        )
    return stride


@register_strategy
class ConvAdapter(BottleneckAdapterStrategy):
    """Conv-Adapter: a frozen CNN plus small trainable convolutional bottlenecks with a learned scale.

    Each adapter is ``A(x) = up(act(down(depthwise(x))))`` (``kind="depthwise"``, the paper's depth-wise separable
    down projection) or ``up(act(down(x)))`` with 1x1 convolutions (``kind="pointwise"``), multiplied by a learned
    per-channel (``scale="channel"``, the paper's scaling vector) or scalar scale ``s``. ``up`` starts at zero and
    ``s`` at ``scale_init``, so the model is unchanged at the start and gradients reach ``up`` at once. Three of the
    paper's placements are offered:

    * ``"parallel_conv"``: beside every spatial (k x k, k > 1; 3x3 or depthwise) convolution inside the blocks,
      ``conv(x) + s * A(x)``; the depthwise convolution copies that conv's kernel, stride, padding and dilation.
    * ``"parallel_block"``: beside every block, ``block(x) + s * A(x)``; ``A`` maps the block's input channels to
      its output channels with the block's stride (measured by a probe forward pass), so downsampling blocks work.
    * ``"sequential"``: after every block, ``y + s * A(y)`` with ``y = block(x)`` (the paper's residual sequential).

    Blocks are timm's numbered blocks from ``group_matcher(coarse=False)``: ``layerN.M`` (ResNet),
    ``stages.N.blocks.M`` (ConvNeXt), ``blocks.N.M`` (EfficientNet, MobileNet), ``sN.bM`` (RegNet). Adapter
    parameters live inside the wrapped block (``layer1.0.adapter.down.weight``), so layer groups keep them in their
    block; the frozen modules move under ``.base``. Adapters are non-linear and cannot be merged into the weights.
    The paper's "convolution sequential" variant is not offered.

    Args:
        placement: ``"parallel_conv"``, ``"parallel_block"`` or ``"sequential"``.
        kind: ``"depthwise"`` or ``"pointwise"``.
        reduction: Bottleneck width is ``input channels // reduction`` (at least 1).
        width: Fixed bottleneck width; overrides ``reduction``.
        kernel_size: Kernel of the depthwise convolution for the block placements.
        act: timm activation name inside the bottleneck.
        scale: ``"channel"`` (one learned scale per output channel) or ``"scalar"``.
        scale_init: Initial value of the scale (not zero: nothing would learn).
        train_head: Also train the classifier head.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_resnet", num_classes=3)
        >>> ConvAdapter(placement="parallel_block", kind="pointwise", reduction=8).setup(model)
        >>> sorted(n for n, p in model.named_parameters() if p.requires_grad and n.startswith("layer1"))
        ['layer1.0.adapter.down.bias', 'layer1.0.adapter.down.weight', 'layer1.0.adapter.up.bias',
         'layer1.0.adapter.up.weight', 'layer1.0.scale']
        >>> ConvAdapter().setup(timm.create_model("test_vit"))
        Traceback (most recent call last):
        ...
        cvft.errors.StrategyError: conv_adapter supports CNNs (...). For ViTs use vit_adapter (or shared_adapter).
    """

    name = "conv_adapter"

    def __init__(
        self,
        placement: str = "parallel_conv",
        kind: str = "depthwise",
        reduction: int = 4,
        width: int | None = None,
        kernel_size: int = 3,
        act: str = "relu",
        scale: str = "channel",
        scale_init: float = 1.0,
        train_head: bool = True,
    ) -> None:
        super().__init__(reduction, width, act, train_head)
        for arg, value, allowed in (
            ("placement", placement, PLACEMENTS),
            ("kind", kind, KINDS),
            ("scale", scale, SCALES),
        ):
            if value not in allowed:
                raise StrategyError(f"conv_adapter: {arg} must be one of {list(allowed)}, got {value!r}.")
        check_positive_int(self.name, "kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise StrategyError(f"conv_adapter: kernel_size must be odd to keep the resolution, got {kernel_size}.")
        if not float(scale_init):
            raise StrategyError(
                "conv_adapter: scale_init must not be 0: with a zero up projection nothing would learn."
            )
        self.placement = placement
        self.kind = kind
        self.kernel_size = kernel_size
        self.scale = scale
        self.scale_init = float(scale_init)

    def _bottleneck(self, in_channels: int, out_channels: int, **geometry) -> ConvBottleneck:
        width = bottleneck_width(in_channels, self.reduction, self.width)
        return ConvBottleneck(in_channels, out_channels, width, self.kind, act=self.act, **geometry)

    def _scale_shape(self, channels: int) -> tuple[int, ...]:
        return (channels, 1, 1) if self.scale == "channel" else ()

    def inject(self, model: nn.Module) -> list[str]:
        """Wrap every block (or every spatial convolution in the blocks) of ``model``; return the wrapped names."""
        self.refuse_vit(model)
        blocks = conv_blocks(model)
        names: list[str] = []
        if self.placement == "parallel_conv":
            for block_name, block in blocks.items():
                for conv_name, conv in spatial_convs(block).items():
                    geometry = dict(kernel_size=conv.kernel_size, stride=conv.stride, dilation=conv.dilation)
                    same = type(conv).__name__ == "Conv2dSame"
                    geometry.update(same_padding=same, padding=None if same else conv.padding)
                    adapter = self._bottleneck(conv.in_channels, conv.out_channels, **geometry)
                    wrapper = ParallelAdapter(conv, adapter, self.scale_init, self._scale_shape(conv.out_channels))
                    names.append(f"{block_name}.{conv_name}")
                    self.wrap(model, names[-1], wrapper)
            if not names:
                raise StrategyError(
                    f"conv_adapter: the blocks of {type(model).__name__} have no spatial (k x k) convolutions; "
                    "use placement='parallel_block' or 'sequential'."
                )
        else:
            shapes = probe_feature_maps(model, blocks)
            for block_name, block in blocks.items():
                (c_in, h_in, _), (c_out, h_out, _) = shapes[block_name]
                if self.placement == "parallel_block":
                    stride = _stride(block_name, h_in, h_out)
                    adapter = self._bottleneck(c_in, c_out, kernel_size=self.kernel_size, stride=stride)
                    wrapper = ParallelAdapter(block, adapter, self.scale_init, self._scale_shape(c_out))
                else:
                    adapter = self._bottleneck(c_out, c_out, kernel_size=self.kernel_size)
                    wrapper = SequentialAdapter(block, adapter, self.scale_init, self._scale_shape(c_out))
                names.append(block_name)
                self.wrap(model, block_name, wrapper)
        try:
            probe_feature_maps(model, {})
        except RuntimeError as err:
            raise StrategyError(
                f"conv_adapter: the adapters do not fit {type(model).__name__} with placement={self.placement!r}, "
                f"kind={self.kind!r} ({err}). Try kind='depthwise' or another placement."
            ) from None
        return names
