"""The ``qat`` strategy: train through int8 fake quantisation, alone or under LoRA."""

from __future__ import annotations

from torch import nn

from cvft.errors import StrategyError
from cvft.strategies._modules import is_conv2d_same, set_submodule
from cvft.strategies.base import Strategy
from cvft.strategies.lowrank.layer import LowRankLayer
from cvft.strategies.lowrank.targets import find_low_rank_targets, low_rank_candidates
from cvft.strategies.qat.fake_quant import ACTIVATION_SCHEMES, activation_fake_quantizer
from cvft.strategies.registry import register_strategy
from cvft.strategies.targets import check_targets

__all__ = ["QAT", "convert_qat", "qat_layers"]


def _fake_quantizable(module: nn.Module) -> bool:
    return type(module) in (nn.Linear, nn.Conv2d) or is_conv2d_same(module)


def qat_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every fake-quantised layer of ``model`` (set up by ``qat``), by module name.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_resnet", num_classes=3)
        >>> QAT().setup(model)
        >>> list(qat_layers(model))[:2]
        ['conv1.0', 'conv1.3']
    """
    from cvft.strategies.qat.layer import QATConv2d, QATLinear

    return {name: module for name, module in model.named_modules() if isinstance(module, (QATLinear, QATConv2d))}


def convert_qat(model: nn.Module) -> nn.Module:
    """Put plain layers with the trained float weights back in place of the fake-quantised ones (torchao's convert).

    The result (``model`` itself) has the original keys; quantising it to int8 (``cvft export --quantize``) then
    computes what the fake-quantised model computed. Does nothing on a model without ``qat`` layers.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit", num_classes=3)
        >>> keys = list(model.state_dict())
        >>> QAT().setup(model)
        >>> list(convert_qat(model).state_dict()) == keys and not qat_layers(model)
        True
    """
    if not any(hasattr(module, "weight_fake_quantizer") for module in model.modules()):
        return model
    for name, layer in qat_layers(model).items():
        set_submodule(model, name, layer.to_float())
    return model


@register_strategy
class QAT(Strategy):
    """Quantisation-aware training: int8 fake-quantised weights (and optionally activations) in every forward.

    The target layers are replaced by :class:`~cvft.strategies.qat.layer.QATLinear` (torchao's
    ``FakeQuantizedLinear``) and :class:`~cvft.strategies.qat.layer.QATConv2d`, which keep the same parameters and
    state-dict keys: which parameters train is left to the strategies around it (alone, everything trains, as in
    ``full``). Gradients pass straight through the rounding (torchao's straight-through estimator), so the model
    learns weights that survive int8 quantisation; ``cvft export --quantize int8-weight-only`` (or ``int8-dynamic``
    with ``activations="per_token"``) then writes the model QAT trained for.

    With LoRA, give ``qat`` first: ``["qat", "lora"]`` trains LoRA (and the head) over a frozen, fake-quantised base,
    the updates in full precision (as torchtune's QAT + LoRA). Merging folds each update into the fake-quantised base
    weight (exact for weight-only QAT); unmerging restores the fake-quantised layer. ``qat`` after a low-rank method
    is refused: it would fake-quantise the low-rank factors instead of the base.

    Args:
        targets: Layers to fake-quantise. Default (``None``): every plain ``nn.Linear`` and ``nn.Conv2d`` (timm's
            ``Conv2dSame`` included) outside the classifier head, which stays in full precision. Otherwise a selector,
            preset, type name, module names or regexes, as for ``lora``.
        activations: ``None`` (weights only) or ``"per_token"``: also fake-quantise each layer's input to int8,
            asymmetric, one scale per token (per pixel for convolutions).

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit", num_classes=3)
        >>> QAT(activations="per_token").setup(model)
        >>> type(model.blocks[0].attn.qkv).__name__, type(model.head).__name__
        ('QATLinear', 'Linear')
    """

    name = "qat"

    def __init__(self, targets: str | list[str] | None = None, activations: str | None = None) -> None:
        self.targets = None if targets is None else check_targets(self.name, targets)
        if activations is not None and activations not in ACTIVATION_SCHEMES:
            activation_fake_quantizer(activations)  # raises, naming the allowed schemes
        self.activations = activations

    def find_targets(self, model: nn.Module) -> list[str]:
        """Names of the layers to fake-quantise, in model order."""
        if self.targets is None:
            names = [name for name, module in low_rank_candidates(model).items() if _fake_quantizable(module)]
            if not names:
                raise StrategyError(
                    f"qat: {type(model).__name__} has no nn.Linear or nn.Conv2d layer outside its classifier head "
                    "to fake-quantise; pass `targets` naming the layers."
                )
            return names
        names = find_low_rank_targets(model, self.targets, self.name)
        for name in names:
            module = model.get_submodule(name)
            if not _fake_quantizable(module):
                raise StrategyError(
                    f"qat fake-quantises plain nn.Linear and nn.Conv2d layers, but target {name!r} is a "
                    f"{type(module).__name__}; leave it out of `targets`."
                )
        return names

    def setup(self, model: nn.Module) -> None:
        """Replace the target layers by fake-quantised ones (same parameters, same keys)."""
        wrapped = [name for name, module in model.named_modules() if isinstance(module, LowRankLayer)]
        if wrapped:
            raise StrategyError(
                f"qat must come before low-rank methods (found {wrapped[0]!r} already wrapped): give "
                "['qat', 'lora'] (LoRA trains over the fake-quantised base), not ['lora', 'qat']."
            )
        from cvft.strategies.qat.layer import make_qat_layer

        for name in self.find_targets(model):
            set_submodule(model, name, make_qat_layer(model.get_submodule(name), self.activations))
