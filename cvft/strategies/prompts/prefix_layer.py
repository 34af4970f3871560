"""Prefix tuning's modules: an attention wrapper that prepends learned keys and values, and the prefix encoder.

:class:`PrefixAttention` wraps timm's ``Attention`` and reuses every part of it (``qkv``, ``q_norm``, ``k_norm``,
``attn_drop``, ``norm``, ``gate``, ``proj``, ``proj_drop``, ``num_heads``, ``head_dim``, ``scale``,
``fused_attn``); only the keys and values gain ``num_tokens`` prefix entries per head::

    out_h = softmax(q_h [pk_h; k_h]^T * scale) [pv_h; v_h]

so the queries, and the output length, stay those of the tokens. The prefixes are used as they are (they already
live in key / value space): ``k_norm`` applies to the tokens' keys only.

The prefixes are either the wrapper's own parameters ``prefix_key`` / ``prefix_value`` of shape
``(num_tokens, attn_dim)`` (split into heads as ``(num_heads, num_tokens, head_dim)``), or, re-parameterised as in
the paper, computed by a :class:`PrefixEncoder` shared by all wrapped blocks:
``MLP(E) = up(tanh(down(E)))`` from a learned embedding ``E`` of shape ``(num_tokens, D)``, where ``up`` outputs the
keys and values of every wrapped block at once (``(num_tokens, layers * 2 * D)``, block-major, key before value).
:meth:`PrefixAttention.fold` turns the encoder's output into plain parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvft.errors import StrategyError

__all__ = ["PrefixAttention", "PrefixEncoder", "is_wrappable_attention"]


def is_wrappable_attention(module: nn.Module) -> bool:
    """Whether ``module`` is exactly timm's ``Attention`` (subclasses and other attention classes may differ).

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit")
        >>> is_wrappable_attention(model.blocks[0].attn), is_wrappable_attention(model.blocks[0].mlp)
        (True, False)
    """
    from timm.layers.attention import Attention

    return type(module) is Attention


class PrefixEncoder(nn.Module):
    """Re-parameterised prefixes of several blocks: ``up(tanh(down(embedding)))``.

    Args:
        num_tokens: Prefix length ``T``.
        dim: Key / value width ``D`` of the wrapped attention layers.
        hidden: Width of the MLP's hidden layer.
        num_layers: Number of wrapped blocks whose keys and values it produces.

    Example:
        >>> encoder = PrefixEncoder(num_tokens=3, dim=8, hidden=16, num_layers=2)
        >>> [tuple(t.shape) for t in encoder.layer_prefixes(1)]
        [(3, 8), (3, 8)]
        >>> sum(p.numel() for p in encoder.parameters()) == 3 * 8 + (8 * 16 + 16) + (16 * 2 * 2 * 8 + 2 * 2 * 8)
        True
    """

    def __init__(self, num_tokens: int, dim: int, hidden: int, num_layers: int) -> None:
        super().__init__()
        self.num_tokens, self.dim, self.num_layers = num_tokens, dim, num_layers
        # N(0, 1) as an nn.Embedding; the MLP keeps nn.Linear's default initialisation
        self.embedding = nn.Parameter(torch.randn(num_tokens, dim))
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, num_layers * 2 * dim)

    def layer_prefixes(self, layer: int) -> tuple[Tensor, Tensor]:
        """Key and value prefixes ``(T, D)`` of wrapped block number ``layer`` (only its rows of ``up`` run)."""
        if not 0 <= layer < self.num_layers:
            raise StrategyError(f"prefix_tuning: layer {layer} out of range for {self.num_layers} encoded layers.")
        hidden = torch.tanh(self.down(self.embedding))
        rows = slice(layer * 2 * self.dim, (layer + 1) * 2 * self.dim)
        key_value = F.linear(hidden, self.up.weight[rows], self.up.bias[rows])
        return key_value[:, : self.dim], key_value[:, self.dim :]


class PrefixAttention(nn.Module):
    """timm's ``Attention`` with ``num_tokens`` learned key and value prefixes per head.

    Args:
        base: The attention module to wrap (exactly ``timm.layers.Attention``); its parameters are frozen.
        num_tokens: Prefix length.
        encoder: A shared :class:`PrefixEncoder` producing the prefixes (re-parameterised mode); ``None`` gives the
            wrapper its own ``prefix_key`` / ``prefix_value`` parameters.
        layer: This block's index among the encoder's layers.

    Example:
        >>> import timm, torch
        >>> attn = timm.create_model("test_vit").blocks[0].attn
        >>> wrapped = PrefixAttention(attn, num_tokens=4)
        >>> wrapped.prefix_key.shape, wrapped(torch.randn(2, 7, 64)).shape
        (torch.Size([4, 64]), torch.Size([2, 7, 64]))
    """

    def __init__(self, base: nn.Module, num_tokens: int, encoder: PrefixEncoder | None = None, layer: int = 0) -> None:
        super().__init__()
        if not is_wrappable_attention(base):
            raise StrategyError(
                f"prefix_tuning wraps timm's Attention module, got {type(base).__name__}; attention with relative "
                "positions, rotary embeddings or windows cannot take key/value prefixes faithfully."
            )
        self.base = base
        self.num_tokens = num_tokens
        self.attn_dim = getattr(base, "attn_dim", base.num_heads * base.head_dim)
        for param in base.parameters():
            param.requires_grad_(False)
        self.layer = layer
        self._encoder: PrefixEncoder | None = None
        if encoder is None:
            weight = base.qkv.weight
            self.prefix_key = nn.Parameter(weight.new_empty(num_tokens, self.attn_dim))
            self.prefix_value = nn.Parameter(weight.new_empty(num_tokens, self.attn_dim))
            nn.init.trunc_normal_(self.prefix_key, std=0.02)
            nn.init.trunc_normal_(self.prefix_value, std=0.02)
        else:
            if encoder.dim != self.attn_dim or encoder.num_tokens != num_tokens:
                raise StrategyError(
                    f"prefix_tuning: the encoder makes {encoder.num_tokens} prefixes of width {encoder.dim}, but this "
                    f"attention needs {num_tokens} of width {self.attn_dim}."
                )
            # shared by all wrapped blocks and registered once, on the model; not a sub-module of each wrapper
            object.__setattr__(self, "_encoder", encoder)

    @property
    def reparameterized(self) -> bool:
        """Whether the prefixes come from a shared :class:`PrefixEncoder` (not yet folded)."""
        return self._encoder is not None

    def prefixes(self) -> tuple[Tensor, Tensor]:
        """Key and value prefixes, each ``(num_tokens, attn_dim)``."""
        if self._encoder is not None:
            return self._encoder.layer_prefixes(self.layer)
        return self.prefix_key, self.prefix_value

    @torch.no_grad()
    def fold(self) -> None:
        """Store the encoder's prefixes as this wrapper's own (trainable) parameters and drop the encoder."""
        if self._encoder is None:
            return
        key, value = self._encoder.layer_prefixes(self.layer)
        self.prefix_key = nn.Parameter(key.detach().clone())
        self.prefix_value = nn.Parameter(value.detach().clone())
        object.__setattr__(self, "_encoder", None)

    def _heads(self, prefix: Tensor, like: Tensor) -> Tensor:
        """``(T, attn_dim)`` to ``(B, heads, T, head_dim)`` in ``like``'s dtype."""
        heads, head_dim = self.base.num_heads, self.base.head_dim
        prefix = prefix.to(like.dtype).reshape(self.num_tokens, heads, head_dim).transpose(0, 1)
        return prefix.unsqueeze(0).expand(like.shape[0], -1, -1, -1)

    def _extend_mask(self, attn_mask: Tensor | None, length: int) -> Tensor | None:
        """The tokens' mask with ``num_tokens`` always-visible prefix columns in front."""
        if attn_mask is None:
            return None
        if attn_mask.shape[-1] != length:
            raise StrategyError(
                f"prefix_tuning: attn_mask must end in the sequence length {length}, "
                f"got shape {tuple(attn_mask.shape)}."
            )
        shape = (*attn_mask.shape[:-1], self.num_tokens)
        visible = attn_mask.new_ones(shape) if attn_mask.dtype == torch.bool else attn_mask.new_zeros(shape)
        return torch.cat([visible, attn_mask], dim=-1)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """The base attention over ``[prefix keys; token keys]`` and ``[prefix values; token values]``."""
        if is_causal:
            raise StrategyError("prefix_tuning: causal attention is not supported; call without is_causal=True.")
        base = self.base
        batch, length, _ = x.shape
        gate = base.gate(x).sigmoid() if getattr(base, "gate", None) is not None else None
        qkv = base.qkv(x).reshape(batch, length, 3, base.num_heads, base.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = base.q_norm(q), base.k_norm(k)
        prefix_key, prefix_value = self.prefixes()
        k = torch.cat([self._heads(prefix_key, k), k], dim=2)
        v = torch.cat([self._heads(prefix_value, v), v], dim=2)
        mask = self._extend_mask(attn_mask, length)
        if base.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=base.attn_drop.p if base.training else 0.0
            )
        else:
            attn = (q * base.scale) @ k.transpose(-2, -1)
            if mask is not None:
                attn = attn.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else attn + mask
            attn = base.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = base.norm(x.transpose(1, 2).reshape(batch, length, self.attn_dim))
        if gate is not None:
            x = x * gate
        return base.proj_drop(base.proj(x))

    def extra_repr(self) -> str:
        """Prefix length and mode, for ``repr(model)``."""
        return f"num_tokens={self.num_tokens}, reparameterized={self.reparameterized}"
