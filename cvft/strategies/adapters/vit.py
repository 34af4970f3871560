"""``vit_adapter``: Houlsby (sequential) and AdaptFormer (parallel) bottleneck adapters in transformer blocks."""

from __future__ import annotations

from torch import nn

from cvft.errors import StrategyError
from cvft.strategies.adapters.layer import LinearBottleneck, ParallelAdapter, SequentialAdapter, bottleneck_width
from cvft.strategies.adapters.strategy import BottleneckAdapterStrategy, check_positions, linear_dims
from cvft.strategies.registry import register_strategy

__all__ = ["ViTAdapter", "STYLES", "STYLE_DEFAULTS", "check_blocks", "select_blocks"]

STYLES = ("houlsby", "adaptformer")
#: Per style, as in the papers: positions, activation and scale ``s``.
STYLE_DEFAULTS: dict[str, dict] = {
    "houlsby": {"positions": ["attn", "mlp"], "act": "gelu", "scale": 1.0},
    "adaptformer": {"positions": ["mlp"], "act": "relu", "scale": 0.1},
}


def select_blocks(method: str, blocks: dict[str, nn.Module], indices: list[int] | None) -> dict[str, nn.Module]:
    """The blocks at ``indices`` (negative ones count from the end), or all of them for ``None``.

    Example:
        >>> list(select_blocks("vit_adapter", {"blocks.0": None, "blocks.1": None, "blocks.2": None}, [0, -1]))
        ['blocks.0', 'blocks.2']
    """
    if indices is None:
        return blocks
    names = list(blocks)
    bad = [i for i in indices if not -len(names) <= i < len(names)]
    if bad:
        raise StrategyError(f"{method}: block indices {bad} are out of range for a model with {len(names)} blocks.")
    chosen = {names[i] for i in indices}
    return {name: module for name, module in blocks.items() if name in chosen}


def check_blocks(method: str, blocks: list[int] | None) -> list[int] | None:
    """Validate a list of block indices (non-empty integers) and return it as a list.

    Example:
        >>> check_blocks("vit_adapter", (0, -1))
        [0, -1]
    """
    if blocks is None:
        return None
    chosen = list(blocks)
    if not chosen or any(not isinstance(i, int) or isinstance(i, bool) for i in chosen):
        raise StrategyError(f"{method}: blocks must be a non-empty list of block indices, got {chosen!r}.")
    return chosen


@register_strategy
class ViTAdapter(BottleneckAdapterStrategy):
    """Bottleneck adapters in the transformer blocks of a frozen ViT-family model.

    ``style="houlsby"`` (Houlsby et al., 2019): a sequential adapter ``h + A(h)`` after the attention and after the
    MLP sub-layer, with ``A(h) = up(act(down(h)))``. ``block.attn`` (and ``block.mlp``) is replaced by a wrapper
    that runs the sub-layer, then the adapter on its output. In timm's ``Block`` the result is
    ``x + drop_path(ls1(h + A(h)))`` with ``h = attn(norm1(x))``: the adapter sits after the attention's output
    projection and *before* LayerScale ``ls1``, drop path and the residual add, as in the paper (after the
    projection, before the skip connection). The same holds for the MLP with ``ls2``.

    ``style="adaptformer"`` (Chen et al., 2022): a parallel adapter beside the MLP, fed the MLP's input:
    ``x + drop_path(ls2(mlp(z) + s * A(z)))`` with ``z = norm2(x)`` (the paper's ``x + mlp(LN(x)) + s * A(LN(x))``;
    with LayerScale the adapter is scaled by ``ls2`` too). ``s`` is 0.1 by default and optionally learned.

    ``up`` starts at zero (``down``: Kaiming-uniform), so the model is unchanged at the start. Works for any block
    with ``attn`` and ``mlp`` sub-modules (ViT, DeiT, EVA, Swin ...; register and class tokens included). Adapter
    parameters live inside the block (``blocks.3.attn.adapter.down.weight``), so layer groups keep them there; the
    frozen sub-layers move under ``.base``. Adapters are non-linear and cannot be merged into the weights.

    Args:
        style: ``"houlsby"`` or ``"adaptformer"``.
        positions: Sub-layers to adapt, a subset of ``["attn", "mlp"]``; defaults to the style's (Houlsby: both,
            AdaptFormer: ``["mlp"]``).
        blocks: Indices of the blocks to adapt (negative from the end); ``None`` adapts every block.
        reduction: Bottleneck width is ``embed_dim // reduction`` (at least 1).
        width: Fixed bottleneck width (the papers' 64 for ViT-B); overrides ``reduction``.
        act: timm activation name; defaults to the style's (Houlsby: GELU, AdaptFormer: ReLU).
        scale: The scale ``s``; defaults to the style's (Houlsby: 1, AdaptFormer: 0.1). Must not be 0.
        learnable_scale: Learn ``s`` (one scalar per adapter) instead of keeping it fixed.
        train_head: Also train the classifier head.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit", img_size=32, num_classes=3)
        >>> ViTAdapter(style="adaptformer", width=8).setup(model)
        >>> sorted(n.removeprefix("blocks.0.mlp.") for n, p in model.named_parameters() if n.startswith("blocks.0."))
        ['adapter.down.bias', 'adapter.down.weight', 'adapter.up.bias', 'adapter.up.weight', 'base.fc1.bias', ...]
        >>> sorted(n for n, p in model.named_parameters() if p.requires_grad)[-2:]
        ['head.bias', 'head.weight']
        >>> ViTAdapter().setup(timm.create_model("test_resnet"))
        Traceback (most recent call last):
        ...
        cvft.errors.StrategyError: vit_adapter supports ViT-family models ... For CNNs use conv_adapter.
    """

    name = "vit_adapter"

    def __init__(
        self,
        style: str = "houlsby",
        positions: list[str] | None = None,
        blocks: list[int] | None = None,
        reduction: int = 8,
        width: int | None = None,
        act: str | None = None,
        scale: float | None = None,
        learnable_scale: bool = False,
        train_head: bool = True,
    ) -> None:
        if style not in STYLES:
            raise StrategyError(f"vit_adapter: style must be one of {list(STYLES)}, got {style!r}.")
        defaults = STYLE_DEFAULTS[style]
        super().__init__(reduction, width, act if act is not None else defaults["act"], train_head)
        self.style = style
        self.positions = check_positions(self.name, positions) or list(defaults["positions"])
        self.blocks = check_blocks(self.name, blocks)
        self.scale = float(scale if scale is not None else defaults["scale"])
        if not self.scale:
            raise StrategyError("vit_adapter: scale must not be 0: with a zero up projection nothing would learn.")
        self.learnable_scale = bool(learnable_scale)

    def inject(self, model: nn.Module) -> list[str]:
        """Wrap the chosen sub-layers of the chosen blocks; return the wrapped sub-layers' names."""
        blocks = select_blocks(self.name, self.vit_blocks(model), self.blocks)
        names = []
        for block_name, block in blocks.items():
            for position in self.positions:
                name = f"{block_name}.{position}"
                sublayer = getattr(block, position)
                in_dim, out_dim = linear_dims(self.name, name, sublayer)
                scale_shape = () if self.learnable_scale else None
                if self.style == "houlsby":
                    adapter = LinearBottleneck(
                        out_dim, out_dim, bottleneck_width(out_dim, self.reduction, self.width), self.act
                    )
                    wrapper = SequentialAdapter(sublayer, adapter, self.scale, scale_shape)
                else:
                    adapter = LinearBottleneck(
                        in_dim, out_dim, bottleneck_width(in_dim, self.reduction, self.width), self.act
                    )
                    wrapper = ParallelAdapter(sublayer, adapter, self.scale, scale_shape)
                self.wrap(model, name, wrapper)
                names.append(name)
        return names
