"""Every numeric option of the tasks is checked in the constructor, with the option, value and range in the error."""

from __future__ import annotations

import math

import pytest

from cvft.errors import ConfigError, CvftError
from cvft.tasks import ImageClassifier, MultiTaskClassifier, ObjectDetector
from cvft.tasks.hparams import RANGES, Interval, check_hparams


def make_classifier(**kwargs):
    return ImageClassifier("test_resnet", **{"pretrained": False, "num_classes": 3, **kwargs})


def make_detector(**kwargs):
    return ObjectDetector(
        2, backbone="test_resnet", **{"pretrained": False, "image_size": 64, "fpn_channels": 32, **kwargs}
    )


def make_multitask(**kwargs):
    return MultiTaskClassifier({"shape": {"num_classes": 3}}, "test_resnet", **{"pretrained": False, **kwargs})


TASKS = {"ImageClassifier": make_classifier, "ObjectDetector": make_detector, "MultiTaskClassifier": make_multitask}

#: (option, bad value, text of the allowed range) shared by the three tasks.
SHARED_BAD = [
    ("lr", -0.1, "> 0"),
    ("lr", 0.0, "> 0"),
    ("lr", math.nan, "> 0"),
    ("lr", math.inf, "> 0"),
    ("weight_decay", -0.01, ">= 0"),
    ("momentum", -0.1, "in [0, 1)"),
    ("momentum", 1.0, "in [0, 1)"),
    ("warmup_epochs", -1.0, ">= 0"),
    ("min_lr_ratio", -0.1, "in [0, 1]"),
    ("min_lr_ratio", 1.5, "in [0, 1]"),
    ("drop_path_rate", -0.1, "in [0, 1)"),
    ("drop_path_rate", 1.0, "in [0, 1)"),
    ("in_chans", 0, "an integer >= 1"),
    ("in_chans", 2.5, "an integer >= 1"),
    ("in_chans", True, "an integer >= 1"),
]

OWN_BAD = [
    ("ImageClassifier", {"num_classes": 0}, "num_classes", "an integer >= 2"),
    ("ImageClassifier", {"num_classes": 1}, "num_classes", "an integer >= 2"),
    ("ImageClassifier", {"num_classes": 2.5}, "num_classes", "an integer >= 2"),
    ("ImageClassifier", {"num_classes": 1, "multi_label": True}, "num_classes", "an integer >= 2"),
    ("ImageClassifier", {"label_smoothing": -0.1}, "label_smoothing", "in [0, 1)"),
    ("ImageClassifier", {"label_smoothing": 1.0}, "label_smoothing", "in [0, 1)"),
    ("ImageClassifier", {"multi_label": True, "pos_weight": [1.0, -1.0, 1.0]}, "pos_weight", ">= 0"),
    ("ImageClassifier", {"focal_gamma": -1.0, "loss": "focal"}, "focal_gamma", ">= 0"),
    ("ObjectDetector", {"anchor_sizes": [32, 0, 128]}, "anchor_sizes", "> 0"),
    ("ObjectDetector", {"aspect_ratios": [0.5, -1.0]}, "aspect_ratios", "> 0"),
    ("MultiTaskClassifier", {"head_lr_scale": 0.0}, "head_lr_scale", "> 0"),
    ("MultiTaskClassifier", {"head_lr_scale": -1.0}, "head_lr_scale", "> 0"),
]


def _assert_names(error: pytest.ExceptionInfo, owner: str, option: str, value, allowed: str) -> None:
    message = str(error.value)
    assert isinstance(error.value, ValueError) and isinstance(error.value, CvftError)
    assert message.startswith(f"{owner}: {option}=")
    assert repr(value) in message or repr(list(value)) in message, message
    assert f"must be {allowed}" in message, message
    assert f"--model.{option}" in message, message


@pytest.mark.parametrize("owner", list(TASKS))
@pytest.mark.parametrize(("option", "value", "allowed"), SHARED_BAD)
def test_shared_numeric_options_are_checked(owner, option, value, allowed):
    with pytest.raises(ConfigError) as error:
        TASKS[owner](**{option: value})
    _assert_names(error, owner, option, value, allowed)


@pytest.mark.parametrize(("owner", "kwargs", "option", "allowed"), OWN_BAD)
def test_task_specific_numeric_options_are_checked(owner, kwargs, option, allowed):
    with pytest.raises(ConfigError) as error:
        TASKS[owner](**kwargs)
    _assert_names(error, owner, option, kwargs[option], allowed)


@pytest.mark.parametrize(
    ("owner", "kwargs"),
    [
        ("ImageClassifier", {"num_classes": 2, "multi_label": True}),
        ("ImageClassifier", {"lr": 1, "weight_decay": 0, "momentum": 0, "warmup_epochs": 0, "min_lr_ratio": 1}),
        ("ImageClassifier", {"drop_path_rate": 0.0, "label_smoothing": 0.0}),
        ("ObjectDetector", {"anchor_sizes": [16, 32, 64, 128, 256], "aspect_ratios": [1.0], "warmup_epochs": 0.5}),
        ("MultiTaskClassifier", {"head_lr_scale": 10.0, "min_lr_ratio": 0.0}),
    ],
)
def test_values_at_the_edges_of_their_range_are_accepted(owner, kwargs):
    model = TASKS[owner](**kwargs)
    for option, value in kwargs.items():
        assert model.hparams[option] == value


def test_interval_text_and_membership():
    assert str(Interval(0.0, low_open=True)) == "> 0"
    assert str(Interval(0.0, 1.0, low_open=True)) == "in (0, 1]"
    assert str(Interval(high=5.0, high_open=True)) == "< 5"
    assert 3 in Interval(1, integer=True) and 3.0 not in Interval(1, integer=True)
    assert "1" not in RANGES["lr"] and None not in RANGES["lr"]


def test_check_hparams_hint_and_overrides():
    with pytest.raises(ConfigError, match=r"Task: num_classes=1 .* >= 2\. A single yes/no label is a two-class"):
        check_hparams("Task", {"num_classes": 1})
    check_hparams("Task", {"num_classes": 1}, {"num_classes": Interval(1, integer=True)})  # a task's own range
    with pytest.raises(KeyError):
        check_hparams("Task", {"no_such_option": 1})
