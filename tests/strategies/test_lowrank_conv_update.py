"""Low-rank updates of convolutions run as one convolution with the updated weight, equal to the branch form.

The branch ``base(x) + scaling * update(x)`` is the definition; the fused form ``conv(x, W + scaling * delta)`` is
what trains (one convolution instead of two or three). Both must agree in outputs and in the factors' gradients, for
every kind of convolution the family wraps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from cvft.strategies.loha import LoHALayer
from cvft.strategies.lokr import LoKrLayer
from cvft.strategies.lora.layer import LoRAConv2d, LoRALinear


class CountConvolutions(TorchFunctionMode):
    """Counts ``conv2d`` calls made while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (F.conv2d, torch.conv2d):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _conv(kind: str) -> nn.Module:
    if kind == "pointwise":
        return nn.Conv2d(8, 12, 1)
    if kind == "depthwise":
        return nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    if kind == "grouped-strided-dilated":
        return nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2, groups=4)
    if kind == "reflect-padding":
        return nn.Conv2d(8, 12, 3, padding=1, padding_mode="reflect")
    from timm.layers import Conv2dSame

    return Conv2dSame(8, 12, 3, stride=2)


LAYERS = {
    "lora": lambda conv: LoRAConv2d(conv, rank=2, alpha=4),
    "loha": lambda conv: LoHALayer(conv, rank=2, alpha=4),
    "lokr": lambda conv: LoKrLayer(conv, rank=2, alpha=4),
}
CONVS = ["pointwise", "depthwise", "grouped-strided-dilated", "reflect-padding", "conv2d_same"]
CASES = [
    pytest.param(method, kind, id=f"{method}-{kind}")
    for method in LAYERS
    for kind in CONVS
    if not (kind == "conv2d_same" and method != "lora")  # LoHA/LoKr wrap plain nn.Conv2d only
]


def _pair(method: str, kind: str) -> tuple[nn.Module, nn.Module]:
    """Two identical layers with non-zero updates: one fused (the default), one forced to the branch form."""
    torch.manual_seed(0)
    fused = LAYERS[method](_conv(kind))
    with torch.no_grad():
        for _, param in fused.lora_parameters():
            param.normal_(0, 0.2)
    torch.manual_seed(0)
    branch = LAYERS[method](_conv(kind))
    branch.load_state_dict(fused.state_dict())
    branch.fuse_conv_update = False
    return fused.train(), branch.train()


@pytest.mark.parametrize(("method", "kind"), CASES)
def test_fused_convolution_equals_the_branch_in_outputs_and_gradients(method, kind):
    fused, branch = _pair(method, kind)
    assert fused.fuses_update() and not branch.fuses_update()
    x = torch.randn(2, 8, 31, 33, generator=torch.Generator().manual_seed(1))
    assert fused.prefers_fused(x)
    x_fused, x_branch = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_fused, out_branch = fused(x_fused), branch(x_branch)
    torch.testing.assert_close(out_fused, out_branch, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(out_fused)
    out_fused.backward(grad_out)
    out_branch.backward(grad_out)
    torch.testing.assert_close(x_fused.grad, x_branch.grad, rtol=1e-5, atol=1e-5)
    grads_branch = {name: p.grad for name, p in branch.lora_parameters()}
    for name, param in fused.lora_parameters():
        assert param.grad is not None and grads_branch[name] is not None, name
        torch.testing.assert_close(param.grad, grads_branch[name], rtol=1e-3, atol=1e-4)  # sums over 2,000 pixels
    assert all(p.grad is None for p in fused.base.parameters())  # the base stays frozen


@pytest.mark.parametrize("method", list(LAYERS))
def test_fused_update_is_a_single_convolution(method):
    fused, branch = _pair(method, "pointwise")
    x = torch.randn(1, 8, 9, 9)
    with CountConvolutions() as fused_count:
        fused(x)
    with CountConvolutions() as branch_count:
        branch(x)
    assert fused_count.calls == 1
    assert branch_count.calls >= 2


def test_fused_layer_is_the_base_at_init_bit_for_bit():
    conv = nn.Conv2d(8, 12, 3, padding=1)
    layer = LoRAConv2d(conv, rank=4, alpha=8)  # B starts at zero
    x = torch.randn(2, 8, 9, 9)
    assert torch.equal(layer(x), conv(x))


def test_dropout_and_linear_layers_keep_the_branch():
    with_dropout = LoRAConv2d(nn.Conv2d(8, 12, 1), rank=2, dropout=0.1)
    linear = LoRALinear(nn.Linear(8, 12), rank=2)
    assert not with_dropout.fuses_update()
    assert not linear.fuses_update()
    with_dropout.eval()  # dropout is off in eval, but the branch still computes the same function
    x = torch.randn(2, 8, 4, 4)
    expected = with_dropout.base(x) + with_dropout.scaling * with_dropout.lora_forward(x)
    torch.testing.assert_close(with_dropout(x), expected)


def test_lora_takes_the_form_that_keeps_less_for_backward():
    """Fused keeps the updated weight (out x in), the branch keeps A(x) (N x rank x H x W): large maps fuse."""
    layer = LoRAConv2d(nn.Conv2d(64, 128, 1), rank=4)  # weight: 8,192 values
    large, small = torch.randn(2, 64, 32, 32), torch.randn(2, 64, 8, 8)  # A(x): 8,192 and 512 values
    assert layer.prefers_fused(large) and not layer.prefers_fused(small)
    with CountConvolutions() as count:
        layer(small)
    assert count.calls == 3  # base, A, B
    strided = LoRAConv2d(nn.Conv2d(64, 128, 1, stride=2), rank=4)  # A(x) at the output's 16 x 16
    assert not strided.prefers_fused(large)
    for method in ("loha", "lokr"):  # their branch is a second full convolution: always fused
        assert LAYERS[method](nn.Conv2d(64, 128, 1)).prefers_fused(small)
