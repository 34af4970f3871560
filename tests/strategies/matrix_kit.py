"""Pieces of the shared strategy matrix: closed-form sizes of the test models, expected-set helpers and ``Row``
(with :func:`injected_row` for the common row that trains the head and what its strategies inject).

Rows of the core and low-rank strategies live in ``test_matrix.py``; other strategy families add theirs in
``rows_<family>.py`` modules beside it (each defines ``ROWS``), which ``test_matrix.py`` collects.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
from strategy_testkit import MODELS, body_group, head_names, module_parameter_names
from torch import nn

from cvft.strategies import build_strategies


# --------------------------------------------------------------------------- closed-form sizes of the test models
@dataclass
class Dims:
    """Parameter counts of a test model, from its hyper-parameters (never by enumerating parameters)."""

    total: int
    head: int
    head_weight: int
    biases: int
    norms: int
    bn_channels: int
    groups: list[int]
    group_bn_channels: list[int]
    #: Parameters a strategy injected (LoRA updates), from the row's closed-form formula.
    injected: int = 0


def _vit_dims(model: nn.Module) -> Dims:
    D, L = model.embed_dim, len(model.blocks)  # noqa: N806
    H = model.blocks[0].mlp.fc1.out_features  # noqa: N806
    N, P, C = model.patch_embed.num_patches, model.patch_embed.patch_size[0], model.num_classes  # noqa: N806
    stem = D + (N + 1) * D + 3 * P * P * D + D  # cls_token, pos_embed, patch conv weight + bias
    block = 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + 2 * D + (D * H + H) + (H * D + D)
    final_norm = 2 * D
    head = D * C + C
    return Dims(
        total=stem + L * block + final_norm + head,
        head=head,
        head_weight=D * C,
        biases=L * (D + 3 * D + D + D + H + D) + D + D + C,
        norms=L * 4 * D + final_norm,
        bn_channels=0,
        groups=[stem] + [block] * (L - 1) + [block + final_norm],
        group_bn_channels=[0] * (L + 1),
    )


def _resnet_dims(model: nn.Module) -> Dims:
    from strategy_testkit import BODY_PREFIXES

    prefixes = [tuple(p.rstrip(".") for p in group) for group in BODY_PREFIXES["test_resnet"]]

    def group_of(module_name: str) -> int | None:
        for index, group in enumerate(prefixes):
            if any(module_name == p or module_name.startswith(p + ".") for p in group):
                return index
        return None

    groups = [0] * len(prefixes)
    group_bn = [0] * len(prefixes)
    for name, module in model.named_modules():
        index = group_of(name)
        if ".lora_" in name:  # injected by LoRA; counted by the row's own formula
            continue
        if isinstance(module, nn.Conv2d) and index is not None:
            assert module.bias is None
            kh, kw = module.kernel_size
            groups[index] += module.in_channels * module.out_channels * kh * kw // module.groups
        elif isinstance(module, nn.BatchNorm2d) and index is not None:
            groups[index] += 2 * module.num_features
            group_bn[index] += module.num_features
    F_, C = model.num_features, model.num_classes  # noqa: N806
    bn_channels = sum(group_bn)
    head = F_ * C + C
    return Dims(
        total=sum(groups) + head,
        head=head,
        head_weight=F_ * C,
        biases=bn_channels + C,
        norms=2 * bn_channels,
        bn_channels=bn_channels,
        groups=groups,
        group_bn_channels=group_bn,
    )


def dims_of(model_name: str, model: nn.Module) -> Dims:
    return _vit_dims(model) if model_name == "test_vit" else _resnet_dims(model)


# --------------------------------------------------------------------------- expected trainable sets
def _all(name, model):
    return {n for n, _ in model.named_parameters()}


def _head(name, model):
    return head_names(model)


def _bn_affine(name, model):
    return module_parameter_names(model, (nn.BatchNorm2d,))


def _biases(name, model):
    return {n for n, _ in model.named_parameters() if n.endswith(".bias")}


def _norms(name, model):
    return module_parameter_names(model, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm))


def _groups(*indices):
    def expected(name, model):
        return set().union(*(body_group(name, model, i) for i in indices))

    return expected


def _union(*parts):
    return lambda name, model: set().union(*(part(name, model) for part in parts))


def _minus(whole, *parts):
    return lambda name, model: whole(name, model) - set().union(*(part(name, model) for part in parts))


def _no_injection(name, model):
    return 0


def weight_shapes(name: str, model: nn.Module) -> list[tuple[int, int]]:
    """``(rows, row size)`` of every Linear / Conv2d weight outside the head, wrapped by a strategy or not.

    ViT: from its hyper-parameters (patch embedding, then qkv, proj, fc1, fc2 per block); ResNet: every convolution's
    geometry (its head is a Linear).
    """
    if name == "test_vit":
        D, L = model.embed_dim, len(model.blocks)  # noqa: N806
        fc1 = model.blocks[0].mlp.fc1
        H = getattr(fc1, "base", fc1).out_features  # wrapped by the strategy  # noqa: N806
        P = model.patch_embed.patch_size[0]  # noqa: N806
        return [(D, 3 * P * P)] + L * [(3 * D, D), (D, D), (H, D), (D, H)]
    shapes = []
    for module in model.modules():
        if type(module) is nn.Conv2d:  # the ResNet's convolutions, wrapped or not
            kh, kw = module.kernel_size
            shapes.append((module.out_channels, module.in_channels // module.groups * kh * kw))
    return shapes


# Parameters of the blocks the test models are built of, written from timm's definitions.
#: A ViT block without LayerScale (test_vit's).
VIT_BLOCK_PARAMS = [
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
]
#: A ResNet BasicBlock without a downsampling shortcut (bias-free convs); a Bottleneck adds conv3 and bn3.
BASIC_BLOCK_PARAMS = ["conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight", "bn2.weight", "bn2.bias"]


# LoRA rows: rank LORA_RANK on the ViT's attention (q and v thirds of qkv, and proj) and on the ResNet's block convs.
LORA_RANK = 4
LORA_SPEC = {"name": "lora", "rank": LORA_RANK, "alpha": 8, "qkv_parts": ["q", "v"]}
RESNET_BLOCK_CONV = re.compile(r"layer[1-4]\.\d+\.conv[123]")


def _lora_spec(model_name: str) -> dict:
    return {**LORA_SPEC, "targets": "vit_attention" if model_name == "test_vit" else "resnet_blocks"}


def _lora_params(name, model):
    if name == "test_vit":
        return {
            f"blocks.{i}.attn.{layer}.{ab}.weight"
            for i in range(len(model.blocks))
            for layer, ab in [("qkv", "lora_A.q"), ("qkv", "lora_B.q"), ("qkv", "lora_A.v"), ("qkv", "lora_B.v")]
            + [("proj", "lora_A"), ("proj", "lora_B")]
        }
    return {
        f"{module}.{ab}.weight"
        for module, _ in model.named_modules()
        if RESNET_BLOCK_CONV.fullmatch(module)
        for ab in ("lora_A", "lora_B")
    }


def _lora_count(name, model):
    """Closed form: r * (in + out) per Linear update (out = D for each qkv third), r * (in * k * k + out) per conv."""
    r = LORA_RANK
    if name == "test_vit":
        D = model.embed_dim  # noqa: N806
        return len(model.blocks) * (2 * r * (D + D) + r * (D + D))
    total = 0
    for module_name, module in model.named_modules():
        if RESNET_BLOCK_CONV.fullmatch(module_name):
            conv = module.base
            kh, kw = conv.kernel_size
            total += r * (conv.in_channels * kh * kw + conv.out_channels)
    return total


# LoHA / LoKr rows: same targets as LoRA (whole qkv, proj; ResNet block convs), factors over the flattened weight.
ADAPTER_RANK = 4


def _adapter_spec(name: str) -> Callable[[str], list[Any]]:
    def specs(model_name: str) -> list[Any]:
        targets = "vit_attention" if model_name == "test_vit" else "resnet_blocks"
        return [{"name": name, "rank": ADAPTER_RANK, "alpha": 8, "targets": targets}]

    return specs


def _adapted_shapes(name, model) -> dict[str, tuple[int, int]]:
    """``(out, in_flat)`` of every adapted weight, from the architecture (ViT: D and 3D; convs: their geometry)."""
    if name == "test_vit":
        D = model.embed_dim  # noqa: N806
        return {
            f"blocks.{i}.attn.{layer}": shape
            for i in range(len(model.blocks))
            for layer, shape in [("qkv", (3 * D, D)), ("proj", (D, D))]
        }
    shapes = {}
    for module_name, module in model.named_modules():
        if RESNET_BLOCK_CONV.fullmatch(module_name):
            conv = module.base
            kh, kw = conv.kernel_size
            shapes[module_name] = (conv.out_channels, conv.in_channels // conv.groups * kh * kw)
    return shapes


def _adapter_params(*suffixes):
    return lambda name, model: {f"{m}.{s}" for m in _adapted_shapes(name, model) for s in suffixes}


def _balanced_split(n: int) -> tuple[int, int]:
    small = max(d for d in range(1, int(n**0.5) + 1) if n % d == 0)
    return small, n // small


def _loha_count(name, model):
    """Closed form: 2 * r * (out + in_flat) per adapted weight (two rank-r products)."""
    return sum(2 * ADAPTER_RANK * (out + inp) for out, inp in _adapted_shapes(name, model).values())


def _lokr_count(name, model):
    """Closed form: o1 * i1 (C) + r * (o2 + i2) (B A) per adapted weight, with balanced splits of out and in_flat."""
    total = 0
    for out, inp in _adapted_shapes(name, model).values():
        (o1, o2), (i1, i2) = _balanced_split(out), _balanced_split(inp)
        total += o1 * i1 + ADAPTER_RANK * (o2 + i2)
    return total


@dataclass(frozen=True)
class Row:
    """One strategy configuration and what it must do."""

    id: str
    specs: list[Any]
    trainable: Callable[[str, nn.Module], set[str]]
    count: Callable[[Dims], int]
    #: Which BatchNorm layers keep fixed statistics: those with a frozen parameter, all, or none.
    bn_fixed: Literal["frozen", "all", "none"] = "frozen"
    lr: float = 1e-2
    covers: tuple[str, ...] = field(default=())
    #: Closed-form number of parameters the strategies inject into the model.
    injected: Callable[[str, nn.Module], int] = _no_injection
    #: Per-model specs, when the specs depend on the architecture (LoRA targets).
    specs_for: Callable[[str], list[Any]] | None = None
    #: Models the row applies to (QLoRA quantises Linear layers only, so it has no CNN row). On the other test
    #: models, setting the row up must raise a ``StrategyError`` that names the families the method supports.
    models: tuple[str, ...] = tuple(MODELS)
    #: Whether the freshly set-up model computes exactly what the original did (zero-initialised updates). Methods
    #: whose paper changes the function at the start (prompt and prefix tokens join the attention) set False and
    #: test against a reference implementation instead.
    unchanged_at_init: bool = True
    #: Folds the method into the model (merge LoRA, fold SSF ...) in place; the output must not change. None: the
    #: method offers no merge.
    merge: Callable[[nn.Module], Any] | None = None
    #: Optional packages the row needs (``("torchao",)`` for the quantisation methods); skipped without them.
    requires: tuple[str, ...] = ()

    @property
    def marks(self) -> list[Any]:
        """A skip mark when a package in :attr:`requires` is not installed."""
        missing = [name for name in self.requires if importlib.util.find_spec(name) is None]
        return [pytest.mark.skip(reason=f"needs {', '.join(missing)}")] if missing else []

    def specs_of(self, model_name: str) -> list[Any]:
        return self.specs_for(model_name) if self.specs_for is not None else self.specs

    @property
    def strategy_names(self) -> set[str]:
        return {s.name for s in build_strategies(self.specs)}


def injected_row(row_id: str, specs: list[Any] | Callable[[str], list[Any]], params, injected, **options: Any) -> Row:
    """A row whose strategies train the head and the parameters they inject: the expected set is the head plus
    ``params(name, model)``, the count the head plus ``injected(name, model)`` (closed form).

    ``specs`` may be a function of the model name: it then serves as ``specs_for``, its ViT specs as the listed ones.
    """
    if callable(specs):
        options["specs_for"] = specs
        specs = specs("test_vit")
    return Row(row_id, specs, _union(_head, params), lambda d: d.head + d.injected, injected=injected, **options)
