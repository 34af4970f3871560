"""Visual Prompt Tuning (Jia et al., 2022): learned prompt tokens join the token sequence of a frozen ViT.

The prompts are put into the sequence by hooks on timm's own modules, so ``forward``, ``forward_features``,
``forward_head`` and gradient checkpointing keep working unchanged:

* a forward hook on ``norm_pre`` (the module after ``_pos_embed`` and ``patch_drop``) inserts the first prompts
  after the prefix tokens: the sequence becomes ``[class/register tokens, prompts, patch tokens]``. Prompts get
  no position embedding, as in the paper;
* with ``deep=True``, a forward pre-hook on block ``i > 0`` replaces the prompt slots of its input (the previous
  block's prompt outputs) by block ``i``'s own prompts;
* a forward pre-hook on the final ``norm`` takes the prompts out again. The norm acts on each token separately, so
  dropping them before it equals dropping them after it; the head, ``fc_norm`` and attention pooling
  (``global_pool='map'``) see exactly the prefix and patch tokens.

``forward_intermediates`` (and ``get_intermediate_layers``) would return block outputs with the prompts inside,
which their reshaping to feature maps cannot handle, so they are replaced by a function that raises a
:class:`~cvft.errors.StrategyError`; attention masks (NaFlex) are refused the same way.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from cvft.errors import StrategyError
from cvft.strategies._freeze import require_head, set_trainable
from cvft.strategies.base import ParameterStrategy
from cvft.strategies.prompts._family import require_vision_transformer
from cvft.strategies.registry import register_strategy

__all__ = ["VPT", "VisualPrompts", "PROMPTS_ATTR", "vpt_init_bound"]

#: Attribute of the model that holds the :class:`VisualPrompts` module (its tokens: ``visual_prompts.tokens``).
PROMPTS_ATTR = "visual_prompts"


def vpt_init_bound(patch_area: int, embed_dim: int) -> float:
    """Half-width ``v`` of the uniform prompt initialisation, ``sqrt(6 / (3 * patch_area + embed_dim))``.

    This is the Xavier-uniform bound of the patch projection (fan-in ``3 * patch_area``, fan-out ``embed_dim``),
    as in the paper's code.

    Example:
        >>> round(vpt_init_bound(16 * 16, 768), 4)
        0.0625
    """
    return math.sqrt(6.0 / (3 * patch_area + embed_dim))


def _refuse_intermediates(method: str, *args: Any, **kwargs: Any) -> NoReturn:
    raise StrategyError(
        f"{method}: forward_intermediates / get_intermediate_layers are not supported on a model with prompt "
        "tokens (its block outputs carry the prompts between the prefix and patch tokens). Use forward_features, "
        "or register forward hooks on the blocks and drop the prompt slots yourself."
    )


class VisualPrompts(nn.Module):
    """Prompt tokens of one ViT and the hooks that put them into its token sequence.

    Args:
        num_tokens: Prompt tokens per layer.
        embed_dim: Token width ``D``.
        num_prefix_tokens: Class, distillation and register tokens before the patches (timm's
            ``num_prefix_tokens``); prompts go right after them.
        depth: Number of blocks; with ``deep`` each gets its own prompts.
        deep: One set of prompts per block (VPT-deep) instead of one at the input (VPT-shallow).
        patch_area: Pixels per patch, for the initialisation bound :func:`vpt_init_bound`.
        dropout: Dropout probability on the prompts.

    Example:
        >>> import torch
        >>> prompts = VisualPrompts(num_tokens=3, embed_dim=8, num_prefix_tokens=1, depth=4, deep=True)
        >>> prompts.tokens.shape
        torch.Size([4, 3, 8])
        >>> x = torch.randn(2, 1 + 5, 8)  # class token + 5 patches
        >>> with_prompts = prompts.insert(x)
        >>> with_prompts.shape, torch.equal(prompts.remove(with_prompts), x)
        (torch.Size([2, 9, 8]), True)
    """

    def __init__(
        self,
        num_tokens: int,
        embed_dim: int,
        num_prefix_tokens: int,
        depth: int = 1,
        deep: bool = False,
        patch_area: int = 256,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.num_prefix_tokens = num_prefix_tokens
        self.deep = deep
        self.tokens = nn.Parameter(torch.empty(depth if deep else 1, num_tokens, embed_dim))
        bound = vpt_init_bound(patch_area, embed_dim)
        nn.init.uniform_(self.tokens, -bound, bound)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._handles: list[Any] = []

    def prompts(self, layer: int, batch: int, like: Tensor) -> Tensor:
        """Prompts of ``layer`` for a batch of ``batch`` sequences, after dropout, in ``like``'s dtype."""
        return self.dropout(self.tokens[layer].to(like.dtype).expand(batch, -1, -1))

    def insert(self, x: Tensor) -> Tensor:
        """``[prefix, prompts of layer 0, patches]`` from ``[prefix, patches]``."""
        p = self.num_prefix_tokens
        return torch.cat([x[:, :p], self.prompts(0, x.shape[0], x), x[:, p:]], dim=1)

    def replace(self, x: Tensor, layer: int) -> Tensor:
        """Swap the prompt slots of ``x`` for the prompts of ``layer``."""
        p, t = self.num_prefix_tokens, self.num_tokens
        return torch.cat([x[:, :p], self.prompts(layer, x.shape[0], x), x[:, p + t :]], dim=1)

    def remove(self, x: Tensor) -> Tensor:
        """``[prefix, patches]`` from ``[prefix, prompts, patches]``."""
        p, t = self.num_prefix_tokens, self.num_tokens
        return torch.cat([x[:, :p], x[:, p + t :]], dim=1)

    # hooks: bound methods (not closures), so that deep copies of the model hook their own prompts
    def _after_norm_pre(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return self.insert(output)

    def _before_block(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        mask = kwargs.get("attn_mask", args[1] if len(args) > 1 else None)
        if mask is not None or kwargs.get("is_causal", False):
            raise StrategyError(
                "vpt: attention masks and causal attention are not supported with prompt tokens (the mask does "
                "not cover the prompt slots); call the model without attn_mask / is_causal."
            )
        if self.deep and index > 0:
            return (self.replace(args[0], index), *args[1:]), kwargs
        return None

    def _before_norm(self, module: nn.Module, args: tuple) -> tuple:
        return (self.remove(args[0]), *args[1:])

    def attach(self, model: nn.Module) -> None:
        """Register the hooks on ``model``'s ``norm_pre``, blocks and ``norm``; refuse intermediate outputs."""
        if self._handles:
            raise StrategyError("vpt: these prompts are already attached to a model.")
        self._handles.append(model.norm_pre.register_forward_hook(self._after_norm_pre))
        for index, block in enumerate(model.blocks):
            hook = functools.partial(self._before_block, index)
            self._handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
        self._handles.append(model.norm.register_forward_pre_hook(self._before_norm))
        refuse = functools.partial(_refuse_intermediates, "vpt")
        model.forward_intermediates = refuse
        model.get_intermediate_layers = refuse

    def detach(self, model: nn.Module) -> None:
        """Remove the hooks from ``model`` again (the tokens stay)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for name in ("forward_intermediates", "get_intermediate_layers"):
            model.__dict__.pop(name, None)

    def extra_repr(self) -> str:
        """Shape and mode, for ``repr(model)``."""
        layers, tokens, dim = self.tokens.shape
        return f"num_tokens={tokens}, dim={dim}, deep={self.deep}, layers={layers}"


@register_strategy
class VPT(ParameterStrategy):
    """Visual Prompt Tuning: train prompt tokens (and the head) of a frozen timm Vision Transformer.

    ``num_tokens`` learned tokens join the sequence after the class and register tokens. VPT-shallow inserts them
    once before the first block; VPT-deep gives every block its own prompts, which replace the previous block's
    prompt outputs. They leave the sequence before the final norm, so pooling and the head see the usual tokens.
    Trainable: ``num_tokens * D`` (shallow) or ``depth * num_tokens * D`` (deep) parameters, plus the head.

    The prompts join the attention, so the model does not compute what it did before setup.

    Args:
        num_tokens: Prompt tokens (per block with ``deep``).
        deep: VPT-deep (prompts at every block) instead of VPT-shallow (prompts at the input only).
        dropout: Dropout probability on the prompt tokens.
        train_head: Also train the classifier head.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_vit", num_classes=3, img_size=32)
        >>> VPT(num_tokens=5, deep=True).setup(model)
        >>> sorted(n for n, p in model.named_parameters() if p.requires_grad)
        ['head.bias', 'head.weight', 'visual_prompts.tokens']
        >>> model.visual_prompts.tokens.shape
        torch.Size([6, 5, 64])
        >>> model.forward_features(torch.randn(2, 3, 32, 32)).shape  # class token + 4 patches, prompts dropped
        torch.Size([2, 5, 64])
    """

    name = "vpt"
    keeps_feature_maps = False  # prompt tokens in the block outputs; forward_intermediates is refused

    def __init__(self, num_tokens: int = 10, deep: bool = False, dropout: float = 0.0, train_head: bool = True) -> None:
        if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 1:
            raise StrategyError(f"vpt: num_tokens must be a positive integer, got {num_tokens!r}.")
        if not 0.0 <= dropout < 1.0:
            raise StrategyError(f"vpt: dropout must be in [0, 1), got {dropout!r}.")
        self.num_tokens = num_tokens
        self.deep = bool(deep)
        self.dropout = float(dropout)
        self.train_head = bool(train_head)

    def setup(self, model: nn.Module) -> None:
        """Add the prompts and their hooks, freeze the backbone, train the prompts (and the head)."""
        require_vision_transformer(model, self.name)
        if hasattr(model, PROMPTS_ATTR):
            raise StrategyError("vpt: the model already has visual prompts; set vpt up once per model.")
        head = require_head(model, self.name, self.train_head)
        patch_size = getattr(model.patch_embed, "patch_size", (1, 1))
        patch_area = math.prod(patch_size) if isinstance(patch_size, (tuple, list)) else int(patch_size) ** 2
        reference = next(model.parameters())
        prompts = VisualPrompts(
            self.num_tokens,
            model.embed_dim,
            model.num_prefix_tokens,
            depth=len(model.blocks),
            deep=self.deep,
            patch_area=patch_area,
            dropout=self.dropout,
        ).to(device=reference.device, dtype=reference.dtype)
        setattr(model, PROMPTS_ATTR, prompts)
        prompts.attach(model)
        set_trainable(model, head | {f"{PROMPTS_ATTR}.tokens"})
        self.apply_bn_policy(model)
