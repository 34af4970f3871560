"""Named layer selectors that work on any timm CNN or ViT: one target resolver for low-rank and additive methods.

Selectors are built on module types, kernel sizes and groups, and on timm's own structure: a layer is *in a block*
when its name matches one of the ``blocks`` patterns of the model's ``group_matcher(coarse=False)`` that number
repeated blocks (``blocks.3``, ``layer2.1``, ``s3.b4``, ``stages.2.blocks.1``, ``layers.1.blocks.0``). Patterns
that timm gives a fixed ordinal mark transitions (ConvNeXt/Swin downsampling, EfficientNet's ``conv_head``, the final
norm) and are not blocks; neither are the stem and the head. A model without ``group_matcher`` counts as blocks the
layers inside numbered containers (``features.3.conv``).

============== =====================================================================================================
``pointwise``  every 1x1 Conv2d with ``groups=1`` in a block (EfficientNet's ``conv_pw`` and ``conv_pwl``, the 1x1
               convs of ResNet bottlenecks and RegNets); depthwise and squeeze-excitation convs are left out
``spatial``    every Conv2d with a kernel larger than 1x1 in a block (ResNet's 3x3 convs, ConvNeXt's ``conv_dw``)
``block_convs`` every Conv2d of a block's main path: ``pointwise`` and ``spatial``, without projection shortcuts
               (sub-modules named ``downsample``, ``shortcut`` or ``skip``)
``attention``  the Linear layers of attention modules in blocks (``qkv``/``q``/``k``/``v`` and ``proj``)
``mlp``        the Linear (or 1x1 conv) layers of MLP modules in blocks (``fc1``, ``fc2``, gated variants)
``all_linear`` every Linear layer outside the classifier head
``all_conv``   every Conv2d layer outside the classifier head
``auto``       ``attention`` for transformers; ``pointwise`` for depthwise-separable CNNs (depthwise convs, no MLP,
               a pointwise conv in every block: EfficientNet, MobileNet); otherwise ``block_convs`` plus ``mlp``
               (ResNet: conv1..conv3 of every block; RegNet likewise; ConvNeXt: ``conv_dw`` and the MLP)
============== =====================================================================================================
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

__all__ = ["SELECTORS", "block_of", "block_patterns", "resolve_auto", "select_layers"]

_SQUEEZE_EXCITE = re.compile(r"SqueezeExcit|SEModule|^SE$|EffectiveSE|EcaModule|CecaModule|GatherExcite")


def block_patterns(model: nn.Module) -> list[re.Pattern[str]] | None:
    """The patterns of ``model``'s ``group_matcher(coarse=False)`` that number repeated blocks.

    Rules with a fixed ordinal (``(0,)``, ``(99999,)``) mark transitions or trailing layers and are left out.
    ``None`` when the model has no usable ``group_matcher`` (or it gives no ``blocks`` rules).

    Example:
        >>> import timm
        >>> block_patterns(timm.create_model("test_resnet"))[0].match("layer2.1.conv1").group(0)
        'layer2.1'
        >>> block_patterns(nn.Linear(2, 2)) is None
        True
    """
    group_matcher = getattr(model, "group_matcher", None)
    if not callable(group_matcher):
        return None
    try:
        spec = group_matcher(coarse=False)
    except Exception:  # noqa: BLE001 - a broken matcher falls back to the container rule
        return None
    blocks = spec.get("blocks") if isinstance(spec, dict) else None
    if blocks is None:
        return None
    entries = [(blocks, None)] if isinstance(blocks, str) else list(blocks)
    return [re.compile(pattern) for pattern, ordinal in entries if ordinal is None]


def block_of(model: nn.Module) -> dict[str, str]:
    """The block each module of ``model`` lies in, by module name (modules outside blocks are left out).

    Example:
        >>> import timm
        >>> blocks = block_of(timm.create_model("test_resnet"))
        >>> blocks["layer1.0.conv1"], "conv1" in blocks
        ('layer1.0', False)
    """
    patterns = block_patterns(model)
    result: dict[str, str] = {}
    for name, _ in model.named_modules():
        if not name:
            continue
        if patterns is not None:
            for pattern in patterns:
                match = pattern.match(name)
                if match and match.end() > 0 and (match.end() == len(name) or name[match.end()] == "."):
                    result[name] = match.group(0)
                    break
        else:
            parts = name.split(".")
            numbered = [i for i, part in enumerate(parts) if part.isdigit()]
            if numbered and numbered[-1] < len(parts) - 1:
                result[name] = ".".join(parts[: numbered[-1] + 1])
    return result


def _parent_type(model: nn.Module, name: str) -> str:
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    return type(model.get_submodule(parent)).__name__


def _is_pointwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and module.groups == 1


def _pointwise(model: nn.Module, candidates: dict[str, nn.Module], blocks: dict[str, str]) -> list[str]:
    return [
        name
        for name, module in candidates.items()
        if name in blocks and _is_pointwise(module) and not _SQUEEZE_EXCITE.search(_parent_type(model, name))
    ]


def _spatial(model: nn.Module, candidates: dict[str, nn.Module], blocks: dict[str, str]) -> list[str]:
    return [
        name
        for name, module in candidates.items()
        if name in blocks and isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)
    ]


_SHORTCUTS = {"downsample", "shortcut", "skip"}


def _block_convs(model: nn.Module, candidates: dict[str, nn.Module], blocks: dict[str, str]) -> list[str]:
    chosen = set(_pointwise(model, candidates, blocks)) | set(_spatial(model, candidates, blocks))
    return [
        name for name in candidates if name in chosen and not _SHORTCUTS & set(name[len(blocks[name]) :].split("."))
    ]


def _attention(model: nn.Module, candidates: dict[str, nn.Module], blocks: dict[str, str]) -> list[str]:
    return [
        name
        for name, module in candidates.items()
        if name in blocks and isinstance(module, nn.Linear) and "Attention" in _parent_type(model, name)
    ]


def _mlp(model: nn.Module, candidates: dict[str, nn.Module], blocks: dict[str, str]) -> list[str]:
    def in_mlp(name: str) -> bool:
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        kind = _parent_type(model, name)
        return parent.rsplit(".", 1)[-1] == "mlp" or "Mlp" in kind or "GLU" in kind

    return [
        name
        for name, module in candidates.items()
        if name in blocks and (isinstance(module, nn.Linear) or _is_pointwise(module)) and in_mlp(name)
    ]


def _all_linear(model: nn.Module, candidates: dict[str, nn.Module], blocks: dict[str, str]) -> list[str]:
    return [name for name, module in candidates.items() if isinstance(module, nn.Linear)]


def _all_conv(model: nn.Module, candidates: dict[str, nn.Module], blocks: dict[str, str]) -> list[str]:
    return [name for name, module in candidates.items() if isinstance(module, nn.Conv2d)]


_Selector = Callable[[nn.Module, dict[str, nn.Module], dict[str, str]], list[str]]
_SELECT: dict[str, _Selector] = {
    "pointwise": _pointwise,
    "spatial": _spatial,
    "block_convs": _block_convs,
    "attention": _attention,
    "mlp": _mlp,
    "all_linear": _all_linear,
    "all_conv": _all_conv,
}
#: Selector names and what they choose (``auto`` included).
SELECTORS: dict[str, str] = {
    "pointwise": "1x1 convs with groups=1 in blocks (no depthwise, no squeeze-excitation)",
    "spatial": "convs with a kernel larger than 1x1 in blocks",
    "block_convs": "pointwise and spatial convs of blocks, projection shortcuts excluded",
    "attention": "Linear layers of attention modules in blocks",
    "mlp": "Linear / 1x1-conv layers of MLP modules in blocks",
    "all_linear": "every Linear layer outside the head",
    "all_conv": "every Conv2d layer outside the head",
    "auto": "attention (transformers), else pointwise (depthwise-separable CNNs), else block_convs + mlp",
}


def resolve_auto(model: nn.Module, candidates: dict[str, nn.Module]) -> tuple[str, list[str]]:
    """What ``auto`` means on ``model``: ``(description, names)``; ``names`` is empty when nothing fits."""
    blocks = block_of(model)
    attention = _attention(model, candidates, blocks)
    if attention:
        return "attention", attention
    pointwise = _pointwise(model, candidates, blocks)
    block_ids = {blocks[name] for name in candidates if name in blocks}
    depthwise = any(
        isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in candidates.values()
    )
    mlp = _mlp(model, candidates, blocks)
    if depthwise and not mlp and pointwise and block_ids <= {blocks[name] for name in pointwise}:
        return "pointwise", pointwise
    chosen = set(_block_convs(model, candidates, blocks)) | set(mlp)
    return "block_convs+mlp", [name for name in candidates if name in chosen]


def select_layers(model: nn.Module, selector: str, candidates: dict[str, nn.Module]) -> list[str]:
    """Names of the ``candidates`` (in model order) that the named ``selector`` chooses on ``model``.

    Args:
        model: The model the candidates belong to.
        selector: A key of :data:`SELECTORS`.
        candidates: The layers a method may wrap, by name (e.g. Linear and Conv2d outside the head).

    Example:
        >>> import timm
        >>> from cvft.strategies.targets import candidate_layers
        >>> model = timm.create_model("test_vit")
        >>> select_layers(model, "attention", candidate_layers(model, lambda m: isinstance(m, nn.Linear)))[:2]
        ['blocks.0.attn.qkv', 'blocks.0.attn.proj']
    """
    if selector == "auto":
        return resolve_auto(model, candidates)[1]
    return _SELECT[selector](model, candidates, block_of(model))
