"""The ``prefix_tuning`` strategy (Li & Liang, 2021, for ViTs) and :func:`fold_prefix`.

Trainable parameters, besides the head, with ``L`` wrapped blocks, ``T = num_tokens`` and ``D`` the attention
width (``embed_dim`` for timm ViTs):

* ``reparameterize=False``: ``L * 2 * T * D`` (``blocks.<i>.attn.prefix_key`` / ``prefix_value``);
* ``reparameterize=True``: ``T * D`` (embedding) ``+ D * hidden + hidden`` (``down``) ``+ hidden * L * 2 * D +
  L * 2 * D`` (``up``), all under ``prefix_encoder.``.

Adapter files and the two states: an adapter saved from a re-parameterised model holds ``prefix_encoder.*`` (and
the head) and loads onto a model set up with ``prefix_tuning(reparameterize=True)`` and the same ``num_tokens``,
``hidden`` and ``blocks``. :func:`fold_prefix` computes the prefixes once, stores them as the wrappers' own
parameters and removes the encoder; an adapter saved after folding holds just the prefixes (and the head) and
loads onto a model set up with ``prefix_tuning(reparameterize=False)`` and the same ``num_tokens`` and ``blocks``.
"""

from __future__ import annotations

from torch import nn

from cvft.errors import StrategyError
from cvft.strategies._freeze import require_head, set_trainable
from cvft.strategies.base import ParameterStrategy
from cvft.strategies.prompts._family import SUPPORTED, require_vision_transformer
from cvft.strategies.prompts.prefix_layer import PrefixAttention, PrefixEncoder, is_wrappable_attention
from cvft.strategies.registry import register_strategy

__all__ = ["PrefixTuning", "ENCODER_ATTR", "fold_prefix", "prefix_layers", "prefix_parameter_names"]

#: Attribute of the model holding the shared :class:`PrefixEncoder` while re-parameterised.
ENCODER_ATTR = "prefix_encoder"


def prefix_layers(model: nn.Module) -> dict[str, PrefixAttention]:
    """Every :class:`PrefixAttention` in ``model``, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PrefixAttention)}


def prefix_parameter_names(model: nn.Module) -> set[str]:
    """Names of the prefix parameters: the wrappers' own prefixes and the shared encoder's parameters."""
    names = {
        f"{name}.{p}" for name, layer in prefix_layers(model).items() for p, _ in layer.named_parameters(recurse=False)
    }
    encoder = getattr(model, ENCODER_ATTR, None)
    if isinstance(encoder, PrefixEncoder):
        names |= {f"{ENCODER_ATTR}.{p}" for p, _ in encoder.named_parameters()}
    return names


def fold_prefix(model: nn.Module) -> nn.Module:
    """Compute re-parameterised prefixes once, keep them as plain parameters and remove the encoder, in place.

    The outputs stay identical; trainability of the new prefix parameters follows the encoder's. A model without
    an encoder (never re-parameterised, or already folded) is left as it is.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_vit", num_classes=3, img_size=32).eval()
        >>> PrefixTuning(num_tokens=2, reparameterize=True, hidden=8).setup(model)
        >>> x = torch.randn(1, 3, 32, 32)
        >>> before = model(x)
        >>> _ = fold_prefix(model)
        >>> hasattr(model, "prefix_encoder"), torch.equal(model(x), before)
        (False, True)
        >>> sorted(n for n, p in model.named_parameters() if p.requires_grad)[:2]
        ['blocks.0.attn.prefix_key', 'blocks.0.attn.prefix_value']
    """
    encoder = getattr(model, ENCODER_ATTR, None)
    trainable = any(p.requires_grad for p in encoder.parameters()) if isinstance(encoder, PrefixEncoder) else True
    for layer in prefix_layers(model).values():
        if layer.reparameterized:
            layer.fold()
            layer.prefix_key.requires_grad_(trainable)
            layer.prefix_value.requires_grad_(trainable)
    if isinstance(encoder, PrefixEncoder):
        delattr(model, ENCODER_ATTR)
    return model


@register_strategy
class PrefixTuning(ParameterStrategy):
    """Prefix tuning: learned key and value prefixes in every (or chosen) attention layer of a frozen ViT.

    Each wrapped block attends over ``num_tokens`` extra keys and values per head; queries and the output length
    stay those of the tokens. With ``reparameterize``, training goes through a small MLP (see
    :class:`~cvft.strategies.prompts.PrefixEncoder`) as in the paper; :func:`fold_prefix` removes it afterwards.
    See :mod:`cvft.strategies.prompts.prefix_tuning` for the parameter counts and how adapter files load.

    The prefixes join the attention, so the model does not compute what it did before setup.

    Args:
        num_tokens: Prefix length ``T`` per attention layer.
        blocks: Indices of the blocks to give prefixes (negative indices count from the end); ``None``: all.
        reparameterize: Produce the prefixes with an MLP from a learned embedding while training.
        hidden: Hidden width of that MLP.
        train_head: Also train the classifier head.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit", num_classes=3, img_size=32)
        >>> PrefixTuning(num_tokens=4, blocks=[-1]).setup(model)
        >>> sorted(n for n, p in model.named_parameters() if p.requires_grad)
        ['blocks.5.attn.prefix_key', 'blocks.5.attn.prefix_value', 'head.bias', 'head.weight']
    """

    name = "prefix_tuning"

    def __init__(
        self,
        num_tokens: int = 10,
        blocks: list[int] | None = None,
        reparameterize: bool = False,
        hidden: int = 512,
        train_head: bool = True,
    ) -> None:
        for arg, value in (("num_tokens", num_tokens), ("hidden", hidden)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise StrategyError(f"prefix_tuning: {arg} must be a positive integer, got {value!r}.")
        if blocks is not None:
            blocks = list(blocks)
            if not blocks or any(not isinstance(b, int) or isinstance(b, bool) for b in blocks):
                raise StrategyError(
                    "prefix_tuning: blocks must be a non-empty list of block indices (or None for all), "
                    f"got {blocks!r}."
                )
        self.num_tokens = num_tokens
        self.blocks = blocks
        self.reparameterize = bool(reparameterize)
        self.hidden = hidden
        self.train_head = bool(train_head)

    def block_indices(self, model: nn.Module) -> list[int]:
        """The chosen block indices of ``model``, non-negative, sorted, without repeats."""
        depth = len(model.blocks)
        if self.blocks is None:
            return list(range(depth))
        wrong = [b for b in self.blocks if not -depth <= b < depth]
        if wrong:
            raise StrategyError(
                f"prefix_tuning: block indices {wrong} are out of range for a model with {depth} blocks "
                f"(valid: {-depth} .. {depth - 1})."
            )
        return sorted({b % depth for b in self.blocks})

    def setup(self, model: nn.Module) -> None:
        """Wrap the chosen blocks' attention, freeze the backbone, train the prefixes (and the head)."""
        require_vision_transformer(model, self.name)
        if prefix_layers(model):
            raise StrategyError("prefix_tuning: the model already has prefixes; set prefix_tuning up once per model.")
        head = require_head(model, self.name, self.train_head)
        indices = self.block_indices(model)
        attentions = [model.blocks[i].attn for i in indices]
        unsupported = sorted({type(a).__name__ for a in attentions if not is_wrappable_attention(a)})
        if unsupported:
            raise StrategyError(
                f"prefix_tuning wraps timm's Attention module, but the blocks use {', '.join(unsupported)}; it "
                f"supports {SUPPORTED}."
            )
        encoder = None
        if self.reparameterize:
            dims = {getattr(a, "attn_dim", a.num_heads * a.head_dim) for a in attentions}
            if len(dims) != 1:
                raise StrategyError(f"prefix_tuning: reparameterize needs one attention width, got {sorted(dims)}.")
            reference = attentions[0].qkv.weight
            encoder = PrefixEncoder(self.num_tokens, dims.pop(), self.hidden, len(indices))
            encoder.to(device=reference.device, dtype=reference.dtype)
            setattr(model, ENCODER_ATTR, encoder)
        for layer, index in enumerate(indices):
            model.blocks[index].attn = PrefixAttention(model.blocks[index].attn, self.num_tokens, encoder, layer)
        set_trainable(model, head | prefix_parameter_names(model))
        self.apply_bn_policy(model)
