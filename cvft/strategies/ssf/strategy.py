r"""The ``ssf`` strategy: choosing the layers SSF follows, injecting the wrappers, and folding them away.

A target is a module name, a regular expression full-matched against module names, a layer type name or a preset:

================= ====================================================================================
``auto``/``all``  every supported layer outside the classifier head: in a ViT the patch-embedding conv,
                  ``qkv``, ``proj``, ``fc1``, ``fc2`` and every LayerNorm (the paper's placement); in a CNN
                  every Conv2d and every norm (BatchNorm, LayerNorm2d, GroupNorm)
``norms``         only the norm layers
type names        ``Linear``, ``Conv2d``, ``LayerNorm``, ``BatchNorm2d``, ``GroupNorm``
family presets    ``vit_attention``, ``vit_mlp``, ``vit_all``, ``resnet_blocks``, ``convnext_blocks``
================= ====================================================================================

Layers an SSF cannot fold into (weight-standardised convs, timm's BatchNormAct2d, norms without affine
parameters) are never candidates; a target matching nothing is an error that lists the candidates.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from cvft.errors import StrategyError
from cvft.strategies._freeze import require_head, set_trainable
from cvft.strategies._modules import set_submodule
from cvft.strategies.base import ParameterStrategy
from cvft.strategies.lowrank import LowRankLayer
from cvft.strategies.registry import register_strategy
from cvft.strategies.ssf.layer import SSFLayer, is_ssf_supported
from cvft.strategies.targets import (
    PRESETS,
    candidate_layers,
    check_targets,
    every_candidate,
    preset_shortcuts,
    resolve_targets,
    type_shortcuts,
)

__all__ = ["SSF", "ssf_candidates", "find_ssf_targets", "inject_ssf", "ssf_layers", "fold_ssf"]

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
TYPE_NAMES: dict[str, type[nn.Module] | tuple[type[nn.Module], ...]] = {
    "Linear": nn.Linear,
    "Conv2d": nn.Conv2d,
    "LayerNorm": nn.LayerNorm,
    "BatchNorm2d": nn.BatchNorm2d,
    "GroupNorm": nn.GroupNorm,
    "norms": _NORM_TYPES,
}
_SHORTCUTS = {"auto": every_candidate, "all": every_candidate, **type_shortcuts(TYPE_NAMES), **preset_shortcuts()}


def ssf_layers(model: nn.Module) -> dict[str, SSFLayer]:
    """Every SSF wrapper in ``model``, by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, SSFLayer)}


def ssf_candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Layers an SSF may follow: supported types, outside the classifier head and outside existing wrappers.

    Example:
        >>> import timm
        >>> list(ssf_candidates(timm.create_model("test_vit")))[:3]
        ['patch_embed.proj', 'blocks.0.norm1', 'blocks.0.attn.qkv']
    """
    return candidate_layers(model, is_ssf_supported, lambda module: isinstance(module, (SSFLayer, LowRankLayer)))


def find_ssf_targets(model: nn.Module, targets: str | Sequence[str] = "auto") -> list[str]:
    r"""Names of the layers SSF follows, in model order.

    Raises:
        StrategyError: A target matches nothing; the message lists candidate layers.

    Example:
        >>> import timm
        >>> find_ssf_targets(timm.create_model("test_resnet"), ["norms", r"layer4\.0\.conv2"])[-3:]
        ['layer4.0.conv2', 'layer4.0.bn2', 'layer4.0.downsample.2']
    """
    candidates = ssf_candidates(model)
    what = f"layer of {type(model).__name__} that SSF can follow"
    hint = (
        f"Give module names, regexes full-matching them, a type name ({', '.join(TYPE_NAMES)}) or a preset "
        f"({', '.join(['auto', 'all', *PRESETS])})."
    )
    return resolve_targets("ssf", model, targets, candidates, _SHORTCUTS, description=what, hint=hint)


def inject_ssf(model: nn.Module, targets: str | Sequence[str] = "auto", init_std: float = 0.0) -> list[str]:
    """Follow every target layer of ``model`` by an SSF (in place); return the wrapped layers' names.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit")
        >>> inject_ssf(model, "vit_attention")[:2]
        ['blocks.0.attn.qkv', 'blocks.0.attn.proj']
        >>> type(model.blocks[0].attn.qkv).__name__
        'SSFLayer'
    """
    names = find_ssf_targets(model, targets)
    for name in names:
        set_submodule(model, name, SSFLayer(model.get_submodule(name), init_std))
    return names


def fold_ssf(model: nn.Module) -> nn.Module:
    """Merge every SSF into the layer it follows and put that plain layer back, in place; return ``model``.

    The result costs nothing extra at inference. Its state dict has the original keys, plus a ``bias`` where a
    bias-free layer (a ResNet conv, ``LayerNorm(bias=False)``) needed one for the shift.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_resnet", num_classes=3).eval()
        >>> SSF().setup(model)
        >>> x = torch.randn(1, 3, 32, 32)
        >>> with torch.no_grad():
        ...     _ = [p.normal_(1.0, 0.1) for n, p in model.named_parameters() if n.endswith("ssf_scale")]
        ...     before = model(x)
        ...     after = fold_ssf(model)(x)
        >>> torch.allclose(before, after, atol=1e-5), len(ssf_layers(model))
        (True, 0)
    """
    for name, layer in ssf_layers(model).items():
        set_submodule(model, name, layer.folded())
    return model


@register_strategy
class SSF(ParameterStrategy):
    """Scale and shift features: freeze the backbone and learn a per-channel affine map after chosen layers.

    By default (``targets="auto"``) an SSF follows every Linear, Conv2d and norm layer outside the classifier
    head: the ViT placement of Lian et al. (patch embedding, qkv, proj, fc1, fc2, norms) and its CNN analogue
    (every conv and BatchNorm). :func:`fold_ssf` merges the trained maps into the layers they follow.

    Args:
        targets: A preset (``"auto"``, ``"all"``, ``"norms"``, the family presets), a type name (``"Linear"``,
            ``"Conv2d"``, ``"LayerNorm"``, ``"BatchNorm2d"``, ``"GroupNorm"``), module names or regexes, or a list.
        init_std: ``0`` starts at the identity (scale 1, shift 0); the paper's code uses ``0.02``
            (scale ``N(1, 0.02)``, shift ``N(0, 0.02)``), which changes the function slightly at the start.
        train_head: Also train the classifier head.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit", num_classes=3)
        >>> SSF(targets="LayerNorm", train_head=False).setup(model)
        >>> sorted(n for n, p in model.named_parameters() if p.requires_grad)[:2]
        ['blocks.0.norm1.ssf_scale', 'blocks.0.norm1.ssf_shift']
    """

    name = "ssf"

    def __init__(self, targets: str | list[str] = "auto", init_std: float = 0.0, train_head: bool = True) -> None:
        targets = check_targets("ssf", targets)
        if not init_std >= 0:
            raise StrategyError(f"ssf: init_std must be >= 0 (0 starts at the identity), got {init_std!r}.")
        self.targets = targets
        self.init_std = float(init_std)
        self.train_head = bool(train_head)

    def setup(self, model: nn.Module) -> None:
        """Freeze the model, insert the SSF wrappers and train their scales and shifts (and the head)."""
        head = require_head(model, "ssf", self.train_head)
        inject_ssf(model, self.targets, self.init_std)
        trainable = set(head)
        for name in ssf_layers(model):
            trainable |= {f"{name}.ssf_scale", f"{name}.ssf_shift"}
        set_trainable(model, trainable)
        self.apply_bn_policy(model)
