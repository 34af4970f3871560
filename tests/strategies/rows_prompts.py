"""Matrix rows of the prompt-based strategies: VPT (shallow and deep) and prefix tuning (plain and re-parameterised).

Expected names and counts come from the ViT's hyper-parameters (``embed_dim``, depth of a fresh model) and the rows'
own settings, never from the strategies' parameters. Both methods put new tokens into the attention, so the model
is not unchanged at initialisation; ``test_prompts.py`` compares them with hand-written reference forwards instead.
"""

from __future__ import annotations

from functools import partial

from matrix_kit import injected_row
from strategy_testkit import fresh_model

from cvft.strategies.prompts import fold_prefix

NUM_TOKENS, HIDDEN = 4, 16


def _sizes() -> tuple[int, int]:
    """``(D, L)`` of a fresh test_vit: embed dim and depth."""
    pristine = fresh_model("test_vit")
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


# Both methods apply to the ViT only, and change its function at the start.
prompt_row = partial(injected_row, models=("test_vit",), unchanged_at_init=False)
VPT, PREFIX = {"name": "vpt", "num_tokens": NUM_TOKENS}, {"name": "prefix_tuning", "num_tokens": NUM_TOKENS}
REPARAMETERIZED = {**PREFIX, "reparameterize": True, "hidden": HIDDEN}
ROWS = [
    prompt_row("vpt-shallow", [VPT], _prompt_params, _vpt_count(deep=False), lr=3e-2),
    prompt_row("vpt-deep", [{**VPT, "deep": True, "dropout": 0.1}], _prompt_params, _vpt_count(deep=True), lr=3e-2),
    prompt_row("prefix_tuning", [PREFIX], _prefix_params, _prefix_count, lr=3e-2),
    prompt_row("prefix_tuning-reparameterized", [REPARAMETERIZED], _encoder_params, _encoder_count, merge=fold_prefix),
]
