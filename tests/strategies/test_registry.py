"""The strategy registry: names, errors that say how to fix them, building from specs."""

from __future__ import annotations

import pytest

from cvft.errors import StrategyError
from cvft.strategies import (
    FreezeLayers,
    LinearProbe,
    Strategy,
    StrategyStack,
    available_strategies,
    build_strategies,
    build_strategy,
    get_strategy,
    register_strategy,
)
from cvft.strategies import registry as registry_module
from cvft.tasks import ImageClassifier


@pytest.fixture()
def isolated_registry(monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))


def test_builtin_strategies_are_registered():
    names = available_strategies()
    assert names == sorted(names)
    expected = {"full", "linear_probe", "classifier_only", "freeze_layers", "bitfit", "norm_only", "embedding_only"}
    assert expected | {"gradual_unfreeze", "layerwise_lr"} <= set(names)
    assert get_strategy("linear_probe") is LinearProbe


def test_unknown_name_lists_close_matches_and_all_names():
    with pytest.raises(StrategyError) as info:
        get_strategy("linear_prob")
    message = str(info.value)
    assert "'linear_prob'" in message and "Did you mean 'linear_probe'" in message
    assert all(name in message for name in available_strategies())
    with pytest.raises(StrategyError, match="Did you mean 'bitfit'"):
        build_strategy("bitfitt")


def test_duplicate_name_from_another_class_is_refused(isolated_registry):
    class Impostor(Strategy):
        name = "linear_probe"

    with pytest.raises(StrategyError, match="already registered.*Choose another `name`"):
        register_strategy(Impostor)
    assert get_strategy("linear_probe") is LinearProbe


def test_duplicate_name_from_a_same_named_class_elsewhere_is_refused(isolated_registry):
    class LinearProbe(Strategy):  # same __qualname__ as the built-in one, different module
        name = "linear_probe"

    LinearProbe.__qualname__ = "LinearProbe"
    with pytest.raises(StrategyError, match="already registered"):
        register_strategy(LinearProbe)
    assert get_strategy("linear_probe").__module__ == "cvft.strategies.freezing"


def test_registering_the_same_class_again_is_allowed(isolated_registry):
    @register_strategy
    class Noop(Strategy):
        name = "noop_registry_test"

    assert register_strategy(Noop) is Noop
    assert "noop_registry_test" in available_strategies()


def test_register_rejects_non_strategies():
    with pytest.raises(TypeError):
        register_strategy(object)


def test_bad_kwargs_name_the_signature():
    with pytest.raises(StrategyError) as info:
        build_strategy({"name": "freeze_layers", "num_layers": 2})
    message = str(info.value)
    assert "freeze_layers" in message and "num_layers" in message and "num_groups" in message and "patterns" in message


def test_invalid_values_raise_strategy_error():
    with pytest.raises(StrategyError, match="exactly one"):
        build_strategy({"name": "freeze_layers"})
    with pytest.raises(StrategyError, match="num_groups"):
        FreezeLayers(num_groups=-1)


def test_mapping_needs_a_name_and_other_types_are_refused():
    with pytest.raises(StrategyError, match="'name'"):
        build_strategy({"num_groups": 2})
    with pytest.raises(StrategyError, match="Cannot build"):
        build_strategy(3)


def test_build_from_names_mappings_instances_and_comma_strings():
    instance = FreezeLayers(num_groups=1)
    assert build_strategy(instance) is instance
    built = build_strategy({"name": "freeze_layers", "num_groups": 2})
    assert isinstance(built, FreezeLayers) and built.num_groups == 2
    assert [s.name for s in build_strategies("layerwise_lr, gradual_unfreeze")] == ["layerwise_lr", "gradual_unfreeze"]
    assert [s.name for s in build_strategies({"name": "bitfit"})] == ["bitfit"]
    assert build_strategies(None) == []


def test_listing_a_strategy_twice_raises():
    with pytest.raises(StrategyError, match="listed twice"):
        StrategyStack(build_strategies("linear_probe,linear_probe"))
    with pytest.raises(StrategyError, match="listed twice"):
        ImageClassifier("test_vit", pretrained=False, num_classes=2, strategies=["bitfit", {"name": "bitfit"}])


def test_config_round_trips_through_build_strategy():
    stack = StrategyStack(build_strategies(["layerwise_lr", {"name": "gradual_unfreeze", "milestones": [2, 4]}]))
    rebuilt = StrategyStack(build_strategies(stack.config()))
    assert rebuilt.config() == stack.config()
