"""The ``side_module`` strategy: a trainable top block or side network beside a frozen timm backbone.

Placement follows timm's contract: the added module acts on the output of the model's final feature module,
``model.feature_info[-1]["module"]`` (ViT: the last block, so the tokens before the final norm; ResNet:
``layer4``; ConvNeXt: ``stages.3``), through a forward hook. ``forward_head`` and every original parameter are left
as they are. For models with a conv after the last stage (EfficientNet's ``conv_head``) the module acts on the
last stage's output, before that conv.

``mode="side"`` also needs the input image: a forward pre-hook on the model (``model(x)``) and one on its stem,
the first child module (``model.forward_features(x)``), capture it for the final hook.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from torch import Tensor, nn

from cvft.errors import StrategyError
from cvft.strategies._freeze import require_head, set_trainable
from cvft.strategies.base import ParameterStrategy
from cvft.strategies.registry import register_strategy
from cvft.strategies.side.layer import SideNetwork, TopBottleneck, TopTransformer

__all__ = ["FeatureLayout", "SideModule", "SideTuning", "SIDE_ATTR"]

#: Attribute of the backbone that holds the added module (its parameters are named ``side_module.*``).
SIDE_ATTR = "side_module"
_SUPPORTED = (
    "timm ViTs (a `blocks` sequence, `patch_embed` and `num_prefix_tokens`) and timm CNNs whose `feature_info` "
    "names a final NCHW feature module (ResNet, ConvNeXt, EfficientNet, RegNet ...)"
)


def _final_features(model: nn.Module) -> tuple[str, int] | None:
    info = getattr(model, "feature_info", None)
    try:
        last = info[-1]
        return last["module"], int(last["num_chs"])
    except (TypeError, KeyError, IndexError):
        return None


def _in_chans(model: nn.Module) -> int:
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is None:
        raise StrategyError(f"side_module: {type(model).__name__} has no Conv2d stem; it supports {_SUPPORTED}.")
    return first_conv.in_channels


class FeatureLayout(NamedTuple):
    """The layout of a backbone's final features, which the added module reads and returns.

    Args:
        tokens: Whether the features are ``(B, N, C)`` tokens (ViT) rather than an NCHW map.
        channels: Channels (token width) of the features.
        patch_size: ViT patch size, to find the patch grid of an input image.
        dynamic_pad: Whether the ViT pads images to a multiple of the patch size.

    Example:
        >>> import torch
        >>> layout = FeatureLayout(tokens=True, channels=8, patch_size=(16, 16))
        >>> layout.grid(torch.zeros(1, 3, 64, 48), num_tokens=13, num_prefix_tokens=1)
        (4, 3)
    """

    tokens: bool
    channels: int
    patch_size: tuple[int, int] | None = None
    dynamic_pad: bool = False

    def check(self, features: Tensor) -> None:
        """Refuse features of another layout (a backbone timm's contract does not cover)."""
        if self.tokens:
            expected = features.ndim == 3 and features.shape[-1] == self.channels
        else:
            expected = features.ndim == 4 and features.shape[1] == self.channels
        if not expected:
            layout = "(B, N, C)" if self.tokens else "NCHW (B, C, H, W)"
            raise StrategyError(
                f"side_module: the final features have shape {tuple(features.shape)}, not {layout} with "
                f"C={self.channels}. side_module supports {_SUPPORTED}."
            )

    def grid(self, image: Tensor, num_tokens: int, num_prefix_tokens: int) -> tuple[int, int]:
        """The patch grid of ``image``, checked against the ``num_tokens`` of its features."""
        height, width = image.shape[-2:]
        ph, pw = self.patch_size
        grid = (-(-height // ph), -(-width // pw)) if self.dynamic_pad else (height // ph, width // pw)
        if grid[0] * grid[1] + num_prefix_tokens != num_tokens:
            raise StrategyError(
                f"side_module: {num_tokens} tokens do not match a {grid[0]}x{grid[1]} patch grid of a "
                f"{height}x{width} image plus {num_prefix_tokens} prefix tokens."
            )
        return grid


class SideModule(nn.Module):
    """The added module plus the hooks' logic; registered on the backbone as ``side_module``.

    Args:
        net: A :class:`TopTransformer`, :class:`TopBottleneck` or :class:`SideNetwork`.
        layout: The layout of the backbone's final features.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_resnet", num_classes=3).eval()
        >>> reference = model.forward_features(torch.ones(1, 3, 32, 32))
        >>> SideTuning(mode="side").setup(model)
        >>> torch.equal(model.forward_features(torch.ones(1, 3, 32, 32)), reference)  # gate 0
        True
        >>> model.side_module.layout.channels, model.side_module.layout.tokens
        (96, False)
    """

    def __init__(self, net: nn.Module, layout: FeatureLayout) -> None:
        super().__init__()
        self.net = net
        self.layout = layout
        #: Set False to compute the original backbone's features (the added module is skipped).
        self.enabled = True
        self._image: Tensor | None = None

    @property
    def needs_image(self) -> bool:
        """Whether the module reads the input image (side-tuning) rather than only the features."""
        return isinstance(self.net, SideNetwork)

    def capture_image(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook: keep the input image for the final-features hook."""
        if args and isinstance(args[0], Tensor) and args[0].ndim == 4:
            self._image = args[0]

    def on_features(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """Forward hook on the final feature module: apply the top block or blend in the side network."""
        if not self.enabled:
            return output
        self.layout.check(output)
        if not self.needs_image:
            return self.net(output)
        # the image stays referenced until the next call: activation checkpointing re-runs this hook in backward
        image = self._image
        if image is None or image.shape[0] != output.shape[0]:
            raise StrategyError(
                "side_module: mode='side' needs the input image of this batch, but none was captured; call the "
                "model (or its forward_features) on images rather than a submodule."
            )
        grid = self.layout.grid(image, output.shape[1], self.net.num_prefix_tokens) if self.layout.tokens else None
        return self.net(image, output, grid)

    def extra_repr(self) -> str:
        """Layout and whether the module is active, for ``repr(model)``."""
        return f"tokens={self.layout.tokens}, channels={self.layout.channels}, enabled={self.enabled}"


@register_strategy
class SideTuning(ParameterStrategy):
    """Expand a frozen backbone by a trainable top block (``mode="top"``) or side network (``mode="side"``).

    The original parameters stay frozen and the original modules untouched; the model computes exactly what it
    did before setup (zero LayerScale, zero last BatchNorm, zero gate). Not mergeable.

    * ``top``: ViT: ``depth`` transformer blocks (the last block's width, heads and MLP ratio) on the tokens after
      the last block; CNN: ``depth`` residual bottlenecks (width ``channels // reduction``) on the final map.
    * ``side``: side-tuning: a ``side_stages``-stage CNN of width ``side_width`` on the image, blended into the
      final features as ``features + gate * side(image)``.

    Args:
        mode: ``"top"`` or ``"side"``.
        depth: Number of top blocks (``mode="top"``).
        reduction: Bottleneck width divisor of the CNN top block.
        side_width: Width of the side network's first stage (``mode="side"``).
        side_stages: Number of stride-2 stages of the side network.
        train_head: Also train the classifier head.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_vit", num_classes=3).eval()
        >>> SideTuning(mode="side", train_head=False).setup(model)
        >>> sorted({n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad})
        ['side_module']
        >>> images = torch.randn(2, 3, 32, 32)
        >>> with_side = model.eval()(images)
        >>> model.side_module.enabled = False  # the original backbone's features
        >>> torch.equal(model(images), with_side)  # the side network's gate starts at zero
        True
    """

    name = "side_module"

    def __init__(
        self,
        mode: Literal["top", "side"] = "top",
        depth: int = 1,
        reduction: int = 4,
        side_width: int = 16,
        side_stages: int = 3,
        train_head: bool = True,
    ) -> None:
        if mode not in ("top", "side"):
            raise StrategyError(f"side_module: mode must be 'top' or 'side', got {mode!r}.")
        for key, value in (("depth", depth), ("reduction", reduction), ("side_width", side_width)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise StrategyError(f"side_module: {key} must be a positive integer, got {value!r}.")
        if not isinstance(side_stages, int) or isinstance(side_stages, bool) or side_stages < 0:
            raise StrategyError(f"side_module: side_stages must be a non-negative integer, got {side_stages!r}.")
        self.mode = mode
        self.depth = depth
        self.reduction = reduction
        self.side_width = side_width
        self.side_stages = side_stages
        self.train_head = bool(train_head)
        self._handles: list = []

    def _build(self, model: nn.Module) -> tuple[SideModule, str]:
        is_vit = all(hasattr(model, a) for a in ("blocks", "patch_embed", "num_prefix_tokens", "embed_dim"))
        final = _final_features(model)
        if is_vit:
            module_name = final[0] if final else f"blocks.{len(model.blocks) - 1}"
            dim, last = int(model.embed_dim), model.blocks[-1]
            attn, mlp = getattr(last, "attn", None), getattr(last, "mlp", None)
            qkv = getattr(attn, "qkv", None)
            fc1 = getattr(mlp, "fc1", None)
            if self.mode == "top":
                net: nn.Module = TopTransformer(
                    dim,
                    num_heads=getattr(attn, "num_heads", max(1, dim // 64)),
                    mlp_ratio=fc1.out_features / dim if isinstance(fc1, nn.Linear) else 4.0,
                    depth=self.depth,
                    qkv_bias=bool(isinstance(qkv, nn.Linear) and qkv.bias is not None),
                    norm_eps=getattr(getattr(last, "norm1", None), "eps", 1e-6),
                )
            else:
                net = SideNetwork(_in_chans(model), dim, self.side_width, self.side_stages, model.num_prefix_tokens)
            patch_embed = model.patch_embed
            layout = FeatureLayout(
                tokens=True,
                channels=dim,
                patch_size=tuple(patch_embed.patch_size),
                dynamic_pad=bool(getattr(patch_embed, "dynamic_img_pad", False)),
            )
            return SideModule(net, layout), module_name
        if final is None:
            raise StrategyError(
                f"side_module: cannot place a module on {type(model).__name__}: it supports {_SUPPORTED}."
            )
        module_name, channels = final
        if self.mode == "top":
            net = TopBottleneck(channels, self.reduction, self.depth)
        else:
            net = SideNetwork(_in_chans(model), channels, self.side_width, self.side_stages)
        return SideModule(net, FeatureLayout(tokens=False, channels=channels)), module_name

    def setup(self, model: nn.Module) -> None:
        """Freeze the model, attach the top block or side network with its hooks, train it (and the head)."""
        if hasattr(model, SIDE_ATTR):
            raise StrategyError(f"side_module: {type(model).__name__} already has a `{SIDE_ATTR}`; apply it once.")
        head = require_head(model, "side_module", self.train_head)
        side, module_name = self._build(model)
        try:
            features_module = model.get_submodule(module_name)
        except AttributeError:
            raise StrategyError(
                f"side_module: feature_info names {module_name!r}, which {type(model).__name__} does not have; "
                f"it supports {_SUPPORTED}."
            ) from None
        reference = next(model.parameters())
        side.to(device=reference.device, dtype=reference.dtype)
        setattr(model, SIDE_ATTR, side)
        self._handles = [features_module.register_forward_hook(side.on_features)]
        if side.needs_image:
            stem = next(iter(model.children()))
            self._handles += [
                model.register_forward_pre_hook(side.capture_image),
                stem.register_forward_pre_hook(side.capture_image),
            ]
        trainable = set(head) | {f"{SIDE_ATTR}.{n}" for n, _ in side.named_parameters()}
        set_trainable(model, trainable)
        self.apply_bn_policy(model)
