"""Every shipped recipe that names ``targets`` names its intent (a named selector), and gets exactly that set.

The backbone is the recipe's ``model.backbone``, or for recipes layered on another one, the backbone its usage
comment names (``--model.backbone X`` or the ``model.backbone`` of the first ``--config`` file). Models are built on
the meta device. The expected sets are defined here from layer types alone, independently of cvft's selectors.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
import yaml
from torch import nn

from cvft.backbones.layer_groups import head_parameter_names
from cvft.strategies.filter_select import filter_layers
from cvft.strategies.lora import find_targets
from cvft.strategies.selectors import SELECTORS
from cvft.strategies.sparse.selection import selectable_layers
from cvft.strategies.ssf import find_ssf_targets

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "configs").rglob("*.yaml"))
#: keywords a strategy defines itself, with the selectors they stand for
OWN_KEYWORDS = {
    ("sparse", "all"): ("all_linear", "all_conv"),
    ("filter_select", "all"): ("all_linear", "all_conv"),
    ("ssf", "auto"): ("all_linear", "all_conv", "norms"),
}


def _with_targets(path: Path) -> list[dict]:
    config = yaml.safe_load(path.read_text()) or {}
    strategies = (config.get("model") or {}).get("strategies") or []
    return [s for s in strategies if isinstance(s, dict) and "targets" in s]


def _backbone(path: Path) -> str:
    config = yaml.safe_load(path.read_text()) or {}
    name = (config.get("model") or {}).get("backbone")
    if name is None:
        text = path.read_text()
        named = re.search(r"--model\.backbone[ =](\S+)", text)
        if named:
            name = named.group(1)
        else:
            base = re.search(r"--config (configs/\S+\.yaml)", text)
            assert base, f"{path.name}: no backbone and no usage line naming a base --config"
            name = yaml.safe_load((ROOT / base.group(1)).read_text())["model"]["backbone"]
    return name.split(".", 1)[0]


def _in_block(name: str) -> bool:
    return any(part.isdigit() for part in name.split("."))


def _parent(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0])


def _expected(model: nn.Module, intent: str) -> set[str]:
    """The layers an intent means, from types, kernel sizes and groups only."""
    head = head_parameter_names(model)
    layers = {
        n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and f"{n}.weight" not in head
    }
    if intent == "pointwise":
        return {
            n
            for n, m in layers.items()
            if isinstance(m, nn.Conv2d)
            and m.kernel_size == (1, 1)
            and m.groups == 1
            and _in_block(n)
            and "SqueezeExcite" not in type(_parent(model, n)).__name__
        }
    if intent == "attention":
        return {
            n for n, m in layers.items() if isinstance(m, nn.Linear) and "Attention" in type(_parent(model, n)).__name__
        }
    if intent == "mlp":
        return {n for n, m in layers.items() if isinstance(m, nn.Linear) and n.split(".")[-2] == "mlp"}
    if intent == "block_convs":
        return {n for n, m in layers.items() if isinstance(m, nn.Conv2d) and _in_block(n) and "downsample" not in n}
    if intent == "norms":  # affine LayerNorm / BatchNorm / GroupNorm layers
        norms = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
        return {
            n
            for n, m in model.named_modules()
            if isinstance(m, norms) and getattr(m, "weight", None) is not None and f"{n}.weight" not in head
        }
    if intent == "all_linear":
        return {n for n, m in layers.items() if isinstance(m, nn.Linear)}
    if intent == "all_conv":
        return {n for n, m in layers.items() if isinstance(m, nn.Conv2d)}
    raise AssertionError(f"no independent definition for intent {intent!r}")


def test_recipes_with_targets_are_found():
    assert len([p for p in RECIPES if _with_targets(p)]) >= 7


@pytest.mark.parametrize("path", [p for p in RECIPES if _with_targets(p)], ids=lambda p: p.name)
def test_recipe_targets_are_named_intents_resolving_to_exactly_the_intended_layers(path):
    backbone = _backbone(path)
    with torch.device("meta"):
        model = timm.create_model(backbone, pretrained=False, num_classes=2)
    for strategy in _with_targets(path):
        entries = strategy["targets"] if isinstance(strategy["targets"], list) else [strategy["targets"]]
        intents = []
        for entry in entries:
            own = OWN_KEYWORDS.get((strategy["name"], entry))
            assert own or (entry in SELECTORS and entry != "auto"), (
                f"{path.name}: target {entry!r} of {strategy['name']} is not a named selector ({', '.join(SELECTORS)})"
            )
            intents.extend(own or [entry])
        expected = set().union(*(_expected(model, intent) for intent in intents))
        resolvers = {"sparse": selectable_layers, "filter_select": filter_layers, "ssf": find_ssf_targets}
        resolve = resolvers.get(strategy["name"], find_targets)
        resolved = set(resolve(model, strategy["targets"]))
        assert resolved and resolved == expected, (path.name, sorted(resolved ^ expected)[:5])


def test_lite0_pointwise_recipes_adapt_conv_pw_and_conv_pwl():
    """The bug this test exists for: ``conv_p[wl]`` matched ``conv_pw`` but not ``conv_pwl``."""
    for name in ("medical/pneumoniamnist_lite0_lora.yaml", "detection/retinanet_lora_shapes.yaml"):
        (strategy,) = _with_targets(ROOT / "configs" / name)
        with torch.device("meta"):
            model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        resolved = find_targets(model, strategy["targets"])
        assert len(resolved) == 31 and sum(n.endswith("conv_pwl") for n in resolved) == 15
