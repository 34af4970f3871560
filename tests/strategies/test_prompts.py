"""VPT and prefix tuning against hand-written reference forwards, and what the shared matrix cannot see.

The references run on a pristine copy of the model (same seed, no hooks, no wrappers) and put the learned tokens in
by hand: VPT concatenates the prompts after the prefix tokens and swaps them per block (deep), prefix tuning
computes ``softmax(q [pk; k]^T * scale) [pv; v]`` per head with plain tensor algebra. The matrix
(``rows_prompts.py``) covers trainable sets, counts, frozen weights, falling loss, adapter files and folding.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from strategy_testkit import NUM_CLASSES, trainable_names
from torch import nn

from cvft.adapter_files import load_adapter, save_adapter
from cvft.errors import CheckpointMismatchError, StrategyError
from cvft.strategies import apply_strategies, build_strategy
from cvft.strategies.prompts import (
    VPT,
    PrefixAttention,
    PrefixEncoder,
    PrefixTuning,
    fold_prefix,
    prefix_layers,
    vpt_init_bound,
)

T = 3  # prompt / prefix tokens


def _vit(name: str = "test_vit", seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    kwargs.setdefault("img_size", 32)
    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs).eval()
    with torch.no_grad():  # LayerScale starts at 1e-5 in the test models; at 1 the tokens matter visibly
        for name_, param in model.named_parameters():
            if name_.endswith(".gamma"):
                param.fill_(1.0)
    return model


def _images(n: int = 2, size: tuple[int, int] = (32, 32), seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def _randomise(params, seed: int = 0, std: float = 0.5) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in params:
            param.copy_(std * torch.randn(param.shape, generator=generator))


# --------------------------------------------------------------------------- VPT reference
def _vpt_reference(pristine: nn.Module, tokens: torch.Tensor, images: torch.Tensor, deep: bool) -> torch.Tensor:
    """Embed, concatenate prompts by hand, run the blocks (swapping prompts when deep), norm, drop, head."""
    p, t = pristine.num_prefix_tokens, tokens.shape[1]
    x = pristine.norm_pre(pristine.patch_drop(pristine._pos_embed(pristine.patch_embed(images))))
    batch = x.shape[0]
    x = torch.cat([x[:, :p], tokens[0].expand(batch, -1, -1), x[:, p:]], dim=1)
    for index, block in enumerate(pristine.blocks):
        if deep and index > 0:
            x = torch.cat([x[:, :p], tokens[index].expand(batch, -1, -1), x[:, p + t :]], dim=1)
        x = block(x)
    x = pristine.norm(x)
    x = torch.cat([x[:, :p], x[:, p + t :]], dim=1)
    return pristine.forward_head(x)


VPT_MODELS = {
    "class_token": ("test_vit", {}),
    "no_class_token": ("test_vit", {"class_token": False, "global_pool": "avg"}),
    "reg_tokens": ("test_vit", {"reg_tokens": 4}),
    "no_embed_class": ("test_vit", {"no_embed_class": True, "reg_tokens": 2}),
    "map_pool": ("test_vit3", {}),
    "fc_norm": ("test_vit", {"global_pool": "avg", "fc_norm": True}),
}


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
@pytest.mark.parametrize("variant", list(VPT_MODELS))
def test_vpt_matches_reference(variant, deep):
    name, kwargs = VPT_MODELS[variant]
    model = _vit(name, **kwargs)
    pristine = _vit(name, **kwargs)
    VPT(num_tokens=T, deep=deep, dropout=0.3).setup(model)
    model.eval()
    tokens = model.visual_prompts.tokens.detach()
    assert tokens.shape == (len(model.blocks) if deep else 1, T, model.embed_dim)
    images = _images()
    with torch.no_grad():
        out = model(images)
        torch.testing.assert_close(out, _vpt_reference(pristine, tokens, images, deep), rtol=0, atol=1e-6)
        pre_logits = model.forward_head(model.forward_features(images), pre_logits=True)
        assert (pre_logits - pristine.forward_head(pristine.forward_features(images), True)).abs().max() > 1e-3
        # forward_features drops the prompts: the head sees exactly prefix + patch tokens
        assert model.forward_features(images).shape == pristine.forward_features(images).shape


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_vpt_dynamic_image_size(deep):
    model = _vit(dynamic_img_size=True, reg_tokens=1)
    pristine = _vit(dynamic_img_size=True, reg_tokens=1)
    VPT(num_tokens=T, deep=deep).setup(model)
    model.eval()
    tokens = model.visual_prompts.tokens.detach()
    for size in [(32, 32), (48, 64)]:
        images = _images(size=size)
        with torch.no_grad():
            out = model(images)
            torch.testing.assert_close(out, _vpt_reference(pristine, tokens, images, deep), rtol=0, atol=1e-6)
            features = model.forward_features(images)
        assert features.shape[1] == 2 + (size[0] // 16) * (size[1] // 16)


def test_vpt_distilled_deit_keeps_both_prefix_tokens():
    model = _vit("deit_tiny_distilled_patch16_224", depth=2)
    pristine = _vit("deit_tiny_distilled_patch16_224", depth=2)
    assert model.num_prefix_tokens == 2
    VPT(num_tokens=T, deep=True).setup(model)
    assert trainable_names(model) == {"visual_prompts.tokens", "head.weight", "head.bias", "head_dist.weight",
                                      "head_dist.bias"}  # fmt: skip
    model.eval()
    with torch.no_grad():
        expected = _vpt_reference(pristine, model.visual_prompts.tokens, _images(), deep=True)
        torch.testing.assert_close(model(_images()), expected, rtol=0, atol=1e-6)


def test_vpt_initialisation_counts_and_trainable_set():
    model = _vit("vit_tiny_patch16_224", depth=3)
    VPT(num_tokens=5, deep=True).setup(model)
    tokens = model.visual_prompts.tokens
    bound = (6 / (3 * 16 * 16 + 192)) ** 0.5
    assert vpt_init_bound(256, 192) == pytest.approx(bound)
    assert tokens.numel() == 3 * 5 * 192
    assert tokens.abs().max() <= bound and tokens.abs().max() > 0.9 * bound
    assert tokens.std().item() == pytest.approx(bound / 3**0.5, rel=0.1)  # std of U(-v, v)
    assert trainable_names(model) == {"visual_prompts.tokens", "head.weight", "head.bias"}
    shallow = _vit()
    VPT(num_tokens=5, train_head=False).setup(shallow)
    assert trainable_names(shallow) == {"visual_prompts.tokens"}
    assert shallow.visual_prompts.tokens.numel() == 5 * 64


def test_vpt_prompt_dropout_is_active_in_training_only():
    model = _vit()
    VPT(num_tokens=T, dropout=0.5).setup(model)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(_images()), model(_images()))
        model.eval()
        assert torch.equal(model(_images()), model(_images()))


@pytest.mark.parametrize("strategy", [VPT(num_tokens=T, deep=True), PrefixTuning(num_tokens=T, reparameterize=True)])
def test_gradient_checkpointing_gives_the_same_outputs_and_gradients(strategy):
    results = []
    for checkpointing in (False, True):
        model = _vit()
        copy.deepcopy(strategy).setup(model)
        model.set_grad_checkpointing(checkpointing)
        model.train()
        out = model(_images())
        out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-6)
    for name, grad in results[0][1].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-5, atol=1e-6)


def test_vpt_refuses_intermediates_masks_and_a_second_setup():
    model = _vit()
    VPT(num_tokens=T).setup(model)
    with pytest.raises(StrategyError, match="forward_intermediates"):
        model.forward_intermediates(_images())
    with pytest.raises(StrategyError, match="forward_intermediates"):
        model.get_intermediate_layers(_images())
    mask = torch.ones(5, 5, dtype=torch.bool)
    with pytest.raises(StrategyError, match="attention masks"):
        model.forward_features(_images(), attn_mask=mask)
    with pytest.raises(StrategyError, match="already"):
        VPT(num_tokens=T).setup(model)


def test_vpt_detach_restores_the_model():
    model, pristine = _vit(), _vit()
    VPT(num_tokens=T).setup(model)
    model.visual_prompts.detach(model)
    with torch.no_grad():
        assert torch.equal(model(_images()), pristine(_images()))
    assert len(model.forward_intermediates(_images(), indices=1)[1]) == 1


def test_deep_copies_use_their_own_tokens():
    model = _vit()
    VPT(num_tokens=T, deep=True).setup(model)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        before = model(_images())
        clone.visual_prompts.tokens.add_(1.0)
        assert torch.equal(model(_images()), before)
        assert not torch.equal(clone(_images()), before)
    model = _vit()
    PrefixTuning(num_tokens=T, reparameterize=True, hidden=8).setup(model)
    clone = copy.deepcopy(model)
    assert all(layer._encoder is clone.prefix_encoder for layer in prefix_layers(clone).values())


# --------------------------------------------------------------------------- prefix tuning reference
def _attention_reference(attn: nn.Module, x: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(q [pk; k]^T * scale) [pv; v] per head, with the module's weights and plain tensor algebra."""
    batch, length, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    width = heads * head_dim
    qkv = x @ attn.qkv.weight.T + (attn.qkv.bias if attn.qkv.bias is not None else 0)
    q, k, v = (t.reshape(batch, length, heads, head_dim).transpose(1, 2) for t in qkv.split(width, dim=-1))
    q, k = attn.q_norm(q), attn.k_norm(k)

    def per_head(prefix):
        return prefix.reshape(-1, heads, head_dim).transpose(0, 1).expand(batch, -1, -1, -1)

    k = torch.cat([per_head(key), k], dim=2)
    v = torch.cat([per_head(value), v], dim=2)
    weights = torch.softmax(q @ k.transpose(-2, -1) * head_dim**-0.5, dim=-1)
    out = attn.norm((weights @ v).transpose(1, 2).reshape(batch, length, width))
    if getattr(attn, "gate", None) is not None:
        out = out * torch.sigmoid(x @ attn.gate.weight.T + (attn.gate.bias if attn.gate.bias is not None else 0))
    return out @ attn.proj.weight.T + attn.proj.bias


def _prefix_reference(pristine: nn.Module, prefixes: dict[int, tuple], images: torch.Tensor) -> torch.Tensor:
    """The ViT forward written out, with the reference attention in the blocks that have prefixes."""
    x = pristine.norm_pre(pristine.patch_drop(pristine._pos_embed(pristine.patch_embed(images))))
    for index, block in enumerate(pristine.blocks):
        if index in prefixes:
            x = x + block.ls1(_attention_reference(block.attn, block.norm1(x), *prefixes[index]))
            x = x + block.ls2(block.mlp(block.norm2(x)))
        else:
            x = block(x)
    return pristine.forward_head(pristine.norm(x))


def _encoder_prefixes(encoder: PrefixEncoder, blocks: list[int]) -> dict[int, tuple]:
    """The documented layout by hand: up(tanh(down(E))) as (T, layers, 2, D), key before value."""
    hidden = torch.tanh(encoder.embedding @ encoder.down.weight.T + encoder.down.bias)
    out = (hidden @ encoder.up.weight.T + encoder.up.bias).reshape(encoder.num_tokens, len(blocks), 2, encoder.dim)
    return {block: (out[:, i, 0], out[:, i, 1]) for i, block in enumerate(blocks)}


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "manual"])
@pytest.mark.parametrize("kind", ["plain", "qk_norm", "gated"])
def test_prefix_attention_matches_reference(kind, fused):
    from timm.layers import Attention

    torch.manual_seed(0)
    base = Attention(32, num_heads=4, qkv_bias=True, qk_norm=kind == "qk_norm", gated=kind == "gated",
                     norm_layer=nn.LayerNorm).eval()  # fmt: skip
    base.fused_attn = fused
    wrapped = PrefixAttention(base, num_tokens=T).eval()
    _randomise([wrapped.prefix_key, wrapped.prefix_value])
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        out = wrapped(x)
        assert out.shape == x.shape
        torch.testing.assert_close(out, _attention_reference(base, x, wrapped.prefix_key, wrapped.prefix_value))
    assert not any(p.requires_grad for p in base.parameters())


def test_prefix_attention_extends_masks():
    from timm.layers import Attention

    outputs = []
    for fused in (True, False):
        torch.manual_seed(0)
        base = Attention(32, num_heads=4).eval()
        base.fused_attn = fused
        wrapped = PrefixAttention(base, num_tokens=T).eval()
        _randomise([wrapped.prefix_key, wrapped.prefix_value])
        x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
        keep = torch.ones(5, 5, dtype=torch.bool)
        keep[:, 3:] = False  # hide the last two tokens from every query
        with torch.no_grad():
            masked = wrapped(x, attn_mask=keep)
            additive = wrapped(x, attn_mask=torch.zeros(5, 5).masked_fill(~keep, float("-inf")))
            # hiding tokens 3 and 4 equals dropping them as keys; the prefixes stay visible
            direct = _attention_reference(base, x, wrapped.prefix_key, wrapped.prefix_value)
        torch.testing.assert_close(masked, additive)
        assert not torch.allclose(masked, direct)
        outputs.append(masked)
        with pytest.raises(StrategyError, match="causal"):
            wrapped(x, is_causal=True)
    torch.testing.assert_close(outputs[0], outputs[1])


@pytest.mark.parametrize("blocks", [None, [0, -1]], ids=["all", "first_last"])
@pytest.mark.parametrize("reparameterize", [False, True], ids=["plain", "reparam"])
def test_prefix_tuning_matches_reference(blocks, reparameterize):
    model, pristine = _vit(qk_norm=True), _vit(qk_norm=True)
    strategy = PrefixTuning(num_tokens=T, blocks=blocks, reparameterize=reparameterize, hidden=8)
    strategy.setup(model)
    model.eval()
    chosen = strategy.block_indices(model)
    assert chosen == ([0, 5] if blocks else list(range(6)))
    if reparameterize:
        _randomise(model.prefix_encoder.parameters(), std=0.3)
        prefixes = _encoder_prefixes(model.prefix_encoder, chosen)
    else:
        _randomise(p for n, p in model.named_parameters() if "prefix_" in n)
        prefixes = {i: (model.blocks[i].attn.prefix_key, model.blocks[i].attn.prefix_value) for i in chosen}
    images = _images()
    with torch.no_grad():
        out = model(images)
        torch.testing.assert_close(out, _prefix_reference(pristine, prefixes, images), rtol=1e-5, atol=1e-5)
        assert (out - pristine(images)).abs().max() > 1e-3
        assert model.forward_features(images).shape == pristine.forward_features(images).shape


def test_prefix_counts_closed_form():
    D, L, hidden = 192, 3, 10  # noqa: N806
    model = _vit("vit_tiny_patch16_224", depth=L)
    PrefixTuning(num_tokens=T, train_head=False).setup(model)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == L * 2 * T * D
    model = _vit("vit_tiny_patch16_224", depth=L)
    PrefixTuning(num_tokens=T, blocks=[1, 2], reparameterize=True, hidden=hidden, train_head=False).setup(model)
    expected = T * D + (D * hidden + hidden) + (hidden * 2 * 2 * D + 2 * 2 * D)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert set(prefix_layers(model)) == {"blocks.1.attn", "blocks.2.attn"}


def test_fold_is_exact_and_leaves_only_prefixes(tmp_path):
    model = _vit()
    stack = apply_strategies(model, [{"name": "prefix_tuning", "num_tokens": T, "reparameterize": True, "hidden": 8}])
    _randomise(model.prefix_encoder.parameters(), std=0.3)
    model.eval()
    reparam_path = save_adapter(model, tmp_path / "reparam", "test_vit", stack.config())
    with torch.no_grad():
        expected = model(_images())
        fold_prefix(model)
        assert torch.equal(model(_images()), expected)
    assert not hasattr(model, "prefix_encoder") and not any(
        layer.reparameterized for layer in prefix_layers(model).values()
    )
    prefix_names = {f"blocks.{i}.attn.prefix_{kv}" for i in range(6) for kv in ("key", "value")}
    assert trainable_names(model) == prefix_names | {"head.weight", "head.bias"}
    fold_prefix(model)  # folding a folded model does nothing
    folded_path = save_adapter(model, tmp_path / "folded", "test_vit", [{"name": "prefix_tuning", "num_tokens": T}])

    # a re-parameterised adapter loads onto a re-parameterised model
    fresh = _vit()
    PrefixTuning(num_tokens=T, reparameterize=True, hidden=8).setup(fresh)
    load_adapter(fresh, reparam_path, backbone="test_vit")
    # a folded adapter loads onto prefix_tuning with reparameterize=False
    plain = _vit()
    PrefixTuning(num_tokens=T).setup(plain)
    load_adapter(plain, folded_path, backbone="test_vit")
    with torch.no_grad():
        assert torch.equal(fresh.eval()(_images()), expected)
        assert torch.equal(plain.eval()(_images()), expected)
    # ... and not onto a re-parameterised one
    with pytest.raises(CheckpointMismatchError, match="not in the model"):
        load_adapter(fresh, folded_path, backbone="test_vit")


def test_fold_of_a_plain_model_changes_nothing():
    model = _vit()
    PrefixTuning(num_tokens=T).setup(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    fold_prefix(model)
    assert {n: p for n, p in model.named_parameters()}.keys() == before.keys()


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("method", ["vpt", "prefix_tuning"])
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("test_resnet", {}), ("test_vit_relpos", {"img_size": 32}), ("eva02_tiny_patch14_224", {"img_size": 28})],
    ids=["cnn", "relpos", "eva"],
)
def test_unsupported_families_are_refused(method, name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)
    with pytest.raises(StrategyError, match=rf"{method} supports timm Vision Transformers .*swin, beit, eva"):
        build_strategy(method).setup(model)


def test_unwrappable_attention_is_refused():
    model = _vit()

    class OtherAttention(nn.Module):
        def forward(self, x):
            return x

    model.blocks[2].attn = OtherAttention()
    with pytest.raises(StrategyError, match="OtherAttention"):
        PrefixTuning(num_tokens=T).setup(model)
    PrefixTuning(num_tokens=T, blocks=[0, 1]).setup(model)  # the other blocks are fine


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"name": "vpt", "num_tokens": 0}, "num_tokens must be a positive integer"),
        ({"name": "vpt", "dropout": 1.0}, "dropout must be in"),
        ({"name": "prefix_tuning", "num_tokens": 2.5}, "num_tokens must be a positive integer"),
        ({"name": "prefix_tuning", "hidden": 0}, "hidden must be a positive integer"),
        ({"name": "prefix_tuning", "blocks": []}, "non-empty list"),
    ],
)
def test_bad_arguments_are_refused(spec, match):
    with pytest.raises(StrategyError, match=match):
        build_strategy(spec)


def test_bad_block_indices_and_second_setup_are_refused():
    with pytest.raises(StrategyError, match=r"out of range .*valid: -6 \.\. 5"):
        PrefixTuning(blocks=[6]).setup(_vit())
    model = _vit()
    PrefixTuning(num_tokens=T).setup(model)
    with pytest.raises(StrategyError, match="already"):
        PrefixTuning(num_tokens=T).setup(model)
    with pytest.raises(StrategyError, match="num_classes=0"):
        VPT().setup(timm.create_model("test_vit", num_classes=0, img_size=32))
