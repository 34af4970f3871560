"""Matrix rows of the prompt-based strategies: VPT (shallow and deep) and prefix tuning (plain and re-parameterised).

Expected names and counts come from the ViT's hyper-parameters (``embed_dim``, depth of a fresh model) and the rows'
own settings, never from the strategies' parameters. Both methods put new tokens into the attention, so the model
is not unchanged at initialisation; ``test_prompts.py`` compares them with hand-written reference forwards instead.
"""

from __future__ import annotations

import timm
from matrix_kit import Row, _head, _union
from strategy_testkit import IMAGE_SIZE

from cvft.strategies.prompts import fold_prefix

NUM_TOKENS, HIDDEN = 4, 16


def _sizes() -> tuple[int, int]:
    """``(D, L)`` of a fresh test_vit: embed dim and depth."""
    pristine = timm.create_model("test_vit", pretrained=False, img_size=IMAGE_SIZE)
    return pristine.embed_dim, len(pristine.blocks)


def _prompt_params(model_name, model):
    return {"visual_prompts.tokens"}


def _vpt_count(deep: bool):
    def count(model_name, model):
        """Closed form: T * D prompts at the input, times L with one set per block."""
        D, L = _sizes()  # noqa: N806
        return (L if deep else 1) * NUM_TOKENS * D

    return count


def _prefix_params(model_name, model):
    _, L = _sizes()  # noqa: N806
    return {f"blocks.{i}.attn.prefix_{kv}" for i in range(L) for kv in ("key", "value")}


def _prefix_count(model_name, model):
    """Closed form: a key and a value prefix of T x D in every one of the L blocks."""
    D, L = _sizes()  # noqa: N806
    return L * 2 * NUM_TOKENS * D


def _encoder_params(model_name, model):
    return {"prefix_encoder.embedding"} | {
        f"prefix_encoder.{m}.{p}" for m in ("down", "up") for p in ("weight", "bias")
    }


def _encoder_count(model_name, model):
    """Closed form: embedding T * D, down D * h + h, up h * (L * 2 * D) + L * 2 * D."""
    D, L = _sizes()  # noqa: N806
    return NUM_TOKENS * D + (D * HIDDEN + HIDDEN) + (HIDDEN * L * 2 * D + L * 2 * D)


ROWS = [
    Row(
        "vpt-shallow",
        [{"name": "vpt", "num_tokens": NUM_TOKENS}],
        _union(_head, _prompt_params),
        lambda d: d.head + d.injected,
        injected=_vpt_count(deep=False),
        models=("test_vit",),
        unchanged_at_init=False,
        lr=3e-2,
    ),
    Row(
        "vpt-deep",
        [{"name": "vpt", "num_tokens": NUM_TOKENS, "deep": True, "dropout": 0.1}],
        _union(_head, _prompt_params),
        lambda d: d.head + d.injected,
        injected=_vpt_count(deep=True),
        models=("test_vit",),
        unchanged_at_init=False,
        lr=3e-2,
    ),
    Row(
        "prefix_tuning",
        [{"name": "prefix_tuning", "num_tokens": NUM_TOKENS}],
        _union(_head, _prefix_params),
        lambda d: d.head + d.injected,
        injected=_prefix_count,
        models=("test_vit",),
        unchanged_at_init=False,
        lr=3e-2,
    ),
    Row(
        "prefix_tuning-reparameterized",
        [{"name": "prefix_tuning", "num_tokens": NUM_TOKENS, "reparameterize": True, "hidden": HIDDEN}],
        _union(_head, _encoder_params),
        lambda d: d.head + d.injected,
        injected=_encoder_count,
        models=("test_vit",),
        unchanged_at_init=False,
        merge=fold_prefix,
        lr=1e-2,
    ),
]
