"""``shared_adapter``: one bottleneck's weights reused at every adapter position, with a learned scale per layer."""

from __future__ import annotations

from torch import nn

from cvft.errors import StrategyError
from cvft.strategies.adapters.conv import KINDS
from cvft.strategies.adapters.layer import (
    ConvBottleneck,
    LinearBottleneck,
    ParallelAdapter,
    SequentialAdapter,
    bottleneck_width,
)
from cvft.strategies.adapters.strategy import BottleneckAdapterStrategy, check_positions, linear_dims
from cvft.strategies.adapters.targets import conv_blocks, probe_feature_maps, transformer_blocks
from cvft.strategies.adapters.vit import STYLE_DEFAULTS, STYLES
from cvft.strategies.registry import register_strategy

__all__ = ["SharedAdapter"]


@register_strategy
class SharedAdapter(BottleneckAdapterStrategy):
    """A weight-shared bottleneck adapter: the same ``down``/``up`` weights at every position, a scale per layer.

    A parameter-sharing variant of the adapters of :class:`~cvft.strategies.adapters.ViTAdapter` and
    :class:`~cvft.strategies.adapters.ConvAdapter` (in the spirit of cross-layer sharing as in ALBERT): each
    position computes ``s_l * A(.)`` with one bottleneck ``A`` and its own learned scalar ``s_l``.

    * ViT-family models: positions as in ``vit_adapter`` (``style="houlsby"``: ``h + s_l * A(h)`` after attention
      and MLP; ``"adaptformer"``: ``mlp(z) + s_l * A(z)`` beside the MLP). One bottleneck per distinct
      ``(in, out)`` feature size: a single one for a plain ViT, one per stage for hierarchical models (Swin).
    * CNNs: sequentially after every block, ``y + s_l * A(y)``; blocks with the same output channels share one
      bottleneck, so a ResNet gets one adapter per stage width (a channel count cannot be shared across widths).

    ``up`` starts at zero and every ``s_l`` at ``scale_init`` (1 by default): the model is unchanged at the start,
    ``up`` gets gradients from every layer at once, and the scales learn as soon as ``up`` moved. The shared
    tensors are listed once by ``named_parameters()``, under the first position that uses them
    (``blocks.0.attn.adapter.down.weight``), so layer groups put them in that block. Trainable size: one bottleneck
    per distinct width plus one scalar per position. Adapters are non-linear and cannot be merged into the weights.

    Args:
        style: ViT placement, ``"houlsby"`` or ``"adaptformer"``.
        positions: ViT sub-layers, a subset of ``["attn", "mlp"]``; defaults to the style's.
        kind: CNN bottleneck, ``"pointwise"`` or ``"depthwise"`` (see ``conv_adapter``).
        reduction: Bottleneck width is ``channels // reduction`` (at least 1).
        width: Fixed bottleneck width; overrides ``reduction``.
        act: timm activation name; defaults to GELU for ViTs (ReLU for AdaptFormer) and ReLU for CNNs.
        scale_init: Initial value of every per-layer scale (not 0: nothing would learn).
        train_head: Also train the classifier head.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit", img_size=32, num_classes=3)
        >>> SharedAdapter(width=4, train_head=False).setup(model)
        >>> model.blocks[0].attn.adapter is model.blocks[5].mlp.adapter
        True
        >>> sum(p.numel() for p in model.parameters() if p.requires_grad) == (64 * 4 + 4 + 4 * 64 + 64) + 2 * 6
        True
    """

    name = "shared_adapter"

    def __init__(
        self,
        style: str = "houlsby",
        positions: list[str] | None = None,
        kind: str = "pointwise",
        reduction: int = 8,
        width: int | None = None,
        act: str | None = None,
        scale_init: float = 1.0,
        train_head: bool = True,
    ) -> None:
        if style not in STYLES:
            raise StrategyError(f"shared_adapter: style must be one of {list(STYLES)}, got {style!r}.")
        if kind not in KINDS:
            raise StrategyError(f"shared_adapter: kind must be one of {list(KINDS)}, got {kind!r}.")
        super().__init__(reduction, width, act if act is not None else "relu", train_head)
        self.act = act  # None: the family's default, chosen in setup
        self.style = style
        self.positions = check_positions(self.name, positions) or list(STYLE_DEFAULTS[style]["positions"])
        self.kind = kind
        if not float(scale_init):
            raise StrategyError("shared_adapter: scale_init must not be 0: with a zero up projection nothing learns.")
        self.scale_init = float(scale_init)

    def inject(self, model: nn.Module) -> list[str]:
        """Wrap every position with the shared bottleneck of its width; return the wrapped names."""
        return self._inject_vit(model) if transformer_blocks(model) else self._inject_cnn(model)

    def _inject_vit(self, model: nn.Module) -> list[str]:
        act = self.act or STYLE_DEFAULTS[self.style]["act"]
        shared: dict[tuple[int, int], LinearBottleneck] = {}
        names = []
        for block_name, block in self.vit_blocks(model).items():
            for position in self.positions:
                name = f"{block_name}.{position}"
                sublayer = getattr(block, position)
                in_dim, out_dim = linear_dims(self.name, name, sublayer)
                key = (out_dim, out_dim) if self.style == "houlsby" else (in_dim, out_dim)
                if key not in shared:
                    shared[key] = LinearBottleneck(*key, bottleneck_width(key[0], self.reduction, self.width), act)
                wrapper_type = SequentialAdapter if self.style == "houlsby" else ParallelAdapter
                self.wrap(model, name, wrapper_type(sublayer, shared[key], self.scale_init, ()))
                names.append(name)
        return names

    def _inject_cnn(self, model: nn.Module) -> list[str]:
        blocks = conv_blocks(model)
        shapes = probe_feature_maps(model, blocks)
        shared: dict[int, ConvBottleneck] = {}
        for block_name, block in blocks.items():
            channels = shapes[block_name][1][0]
            if channels not in shared:
                width = bottleneck_width(channels, self.reduction, self.width)
                shared[channels] = ConvBottleneck(channels, channels, width, self.kind, act=self.act or "relu")
            self.wrap(model, block_name, SequentialAdapter(block, shared[channels], self.scale_init, ()))
        return list(blocks)
