"""User image pipelines (``train_transform`` / ``eval_transform``): loaded safely, checked on real data, saved.

A pipeline is given as

* a path to an albumentations YAML or JSON file in albumentations' own format (what ``A.save(pipeline, path,
  data_format="yaml")`` writes);
* the same serialised form inline, as a mapping in the YAML config (with or without the ``__version__`` /
  ``transform`` envelope of ``A.to_dict``);
* from Python: an albumentations transform or ``Compose`` (saved through ``A.to_dict``), or any callable taking the
  ``H x W x C`` image array (``uint8``; ``float32`` in ``[0, 1]`` for medical data) and returning the tensor.

Files and mappings are read with ``yaml.safe_load`` / ``json`` and only classes in albumentations' registry of
serialisable transforms are built (albumentations' own, ``albumentations.pytorch``, and cvft's steps in
:mod:`cvft.data.auto_augment` and :mod:`cvft.data.random_erasing`): no Python object is unpickled and no code is
named by the file. ``Lambda`` steps are refused. A step without ``p`` gets its class's default (``A.load`` would use
0.5, which for a hand-written ``Normalize`` means normalising half the images).

The pipeline is complete: cvft appends nothing, so it must end in ``Normalize(mean, std)`` and ``ToTensorV2()``. At
setup, :func:`check_pipeline_output` runs it on a real image of the split and on a black and a white image of the same
shape and refuses it (:class:`~cvft.errors.ConfigError`, naming the step) when a step fails, or the output is not a
floating-point ``C x H x W`` tensor of the model's channels and input size, or it is not normalised. *Normalised*
means: no value beyond ±100 (0-255 pixel values were divided by 255 and by the std), some value below 0 (the mean
was subtracted), and black and white inputs differing by at least 0.5 on average under at least one of 8 seeds (the
values were not divided by 255 twice; random photometric steps may swap or flatten them under a given seed).

A Python callable cannot be written into a checkpoint or a config: it is used for this run only (logged at
WARNING), and ``cvft predict`` / ``cvft test`` with ``--ckpt_path`` fall back to cvft's evaluation pipeline unless the
same callable is passed again.
"""

from __future__ import annotations

import copy
import difflib
import enum
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
import yaml
from albumentations.core.serialization import (
    NON_SERIALIZABLE_REGISTRY,
    SERIALIZABLE_REGISTRY,
    register_additional_transforms,
    shorten_class_name,
)

import cvft.data.auto_augment  # noqa: F401  (registers cvft's steps with albumentations)
import cvft.data.random_erasing  # noqa: F401
from cvft.errors import ConfigError

__all__ = ["UserPipeline", "check_pipeline_output", "load_user_pipeline"]

_logger = logging.getLogger(__name__)

_MAX_VALUE = 100.0
_MIN_CONTRAST = 0.5
_SEEDS = 8  # random steps (solarize, invert, erasing) may hide the contrast under one seed, never under all


@dataclass
class UserPipeline:
    """A user's pipeline, ready to use.

    Attributes:
        option: ``"train_transform"`` or ``"eval_transform"`` (named in messages).
        transform: Callable as cvft's datasets call it: ``transform(image=array)["image"]``.
        serialised: Its ``A.to_dict`` form (what the run saves), or ``None`` for a Python callable.
        source: Where it came from, for messages (``file augment.yaml``, ``inline mapping``, ``Python callable``).
    """

    option: str
    transform: Any
    serialised: dict[str, Any] | None
    source: str

    def fresh(self, seed: int | None = None) -> Any:
        """A copy of the transform for one dataset; albumentations pipelines get their generator seeded with ``seed``.

        Args:
            seed: Seed of the copy's own random generator (``None``: unseeded).

        Returns:
            The copy (the transform itself when it cannot be copied).
        """
        try:
            transform = copy.deepcopy(self.transform)
        except Exception:  # a callable holding something uncopyable: share it
            transform = self.transform
        if isinstance(transform, A.BaseCompose):
            transform.set_random_seed(seed)
        return transform


class _CallablePipeline:
    """A plain ``image -> tensor`` callable in the ``transform(image=...) -> {"image": ...}`` form of the datasets."""

    def __init__(self, function: Callable[[np.ndarray], Any]) -> None:
        self.function = function

    def __call__(self, image: np.ndarray, **_: Any) -> dict[str, Any]:
        return {"image": self.function(image)}


def load_user_pipeline(spec: Any, option: str) -> UserPipeline | None:
    """Read a ``train_transform`` / ``eval_transform`` value into a :class:`UserPipeline` (``None`` stays ``None``).

    Args:
        spec: A path to an albumentations ``.yaml`` / ``.yml`` / ``.json`` file, a serialised mapping, an
            albumentations transform, or a callable ``image -> tensor``.
        option: The option's name, for messages.

    Returns:
        The pipeline, or ``None`` when ``spec`` is ``None``.

    Raises:
        ConfigError: The file is missing or unreadable, or a step is unknown, not serialisable or misconfigured;
            the message names the step (its position and class) and the fix.

    Example:
        >>> pipeline = load_user_pipeline({"transform": {"__class_fullname__": "Compose", "transforms": [
        ...     {"__class_fullname__": "Resize", "height": 8, "width": 8}]}}, "eval_transform")
        >>> [type(step).__name__ for step in pipeline.transform.transforms], pipeline.source
        (['Resize'], 'inline mapping')
    """
    if spec is None:
        return None
    if isinstance(spec, (str, Path)):
        path = Path(spec).expanduser()
        return _from_mapping(_read_file(path, option), option, f"file {spec}")
    if isinstance(spec, Mapping):
        return _from_mapping(spec, option, "inline mapping")
    if isinstance(spec, (A.BaseCompose, A.BasicTransform)):
        transform = spec if isinstance(spec, A.BaseCompose) else A.Compose([spec])
        try:
            serialised: dict[str, Any] | None = _plain_data(A.to_dict(transform))
        except Exception:  # Lambda steps and custom transforms without to_dict
            serialised = None
            _warn_unsaved(option, f"albumentations {type(spec).__name__} that cannot be serialised (A.to_dict)")
        return UserPipeline(option, transform, serialised, f"Python {type(spec).__name__}")
    if callable(spec):
        _warn_unsaved(option, f"Python callable {getattr(spec, '__name__', type(spec).__name__)}")
        return UserPipeline(option, _CallablePipeline(spec), None, "Python callable")
    raise ConfigError(
        f"{option} must be a path to an albumentations YAML/JSON file, a serialised pipeline mapping (A.to_dict), an "
        f"albumentations transform or a callable image -> tensor; got a {type(spec).__name__}."
    )


def _warn_unsaved(option: str, what: str) -> None:
    _logger.warning(
        "%s is a %s: it is used for this run but cannot be saved with it, so `cvft predict` / `cvft test` with "
        "--ckpt_path use cvft's own evaluation pipeline unless you pass it again. Give an albumentations pipeline "
        "(A.save file or mapping) to save it.",
        option,
        what,
    )


def _read_file(path: Path, option: str) -> Any:
    if not path.is_file():
        raise ConfigError(
            f"{option} file {path} does not exist (looked at {path.resolve()}). Write it with "
            "A.save(pipeline, path, data_format='yaml'), or give the pipeline inline."
        )
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise ConfigError(f"{option} file {path} is not valid {path.suffix.lstrip('.').upper()}: {error}") from None


def _from_mapping(mapping: Any, option: str, source: str) -> UserPipeline:
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{option} ({source}) holds a {type(mapping).__name__}, not an albumentations pipeline.")
    root = mapping.get("transform", mapping)
    register_additional_transforms()  # albumentations.pytorch (ToTensorV2)
    transform = _build(root, option, source, [])
    if not isinstance(transform, A.BaseCompose):
        transform = A.Compose([transform])
    return UserPipeline(option, transform, _plain_data(A.to_dict(transform)), source)


def _plain_data(serialised: dict[str, Any]) -> dict[str, Any]:
    """``A.to_dict`` output as JSON data: NumPy values and enums made plain, for ``torch.load(weights_only=True)``."""

    def plain(value: Any) -> Any:
        if isinstance(value, np.generic | np.ndarray):
            return value.tolist()
        if isinstance(value, enum.Enum):
            return value.value
        raise TypeError(f"cannot save a {type(value).__name__} in a pipeline's serialised form")

    return json.loads(json.dumps(serialised, default=plain))


def _build(node: Any, option: str, source: str, path: list[str]) -> Any:
    """Instantiate one serialised transform (and its children), naming the step in every error."""
    where = f"{option} ({source}), " + (" > ".join(path) if path else "the pipeline")
    if not isinstance(node, Mapping) or "__class_fullname__" not in node:
        raise ConfigError(f"{where}: expected a mapping with __class_fullname__ (as A.save writes), got {node!r:.120}.")
    name = str(node["__class_fullname__"])
    key = shorten_class_name(name)
    if key in NON_SERIALIZABLE_REGISTRY or name in NON_SERIALIZABLE_REGISTRY:
        raise ConfigError(f"{where}: {name} holds Python code and cannot be loaded from a file; pass it from Python.")
    cls = SERIALIZABLE_REGISTRY.get(key)
    if cls is None:
        close = difflib.get_close_matches(key, list(SERIALIZABLE_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"{where}: unknown transform {name!r}: not an albumentations transform (class names as A.save writes "
            f"them, e.g. HorizontalFlip, or cvft.data.auto_augment.RandAugment).{hint}"
        )
    arguments = {k: v for k, v in node.items() if k not in ("__class_fullname__", "transforms")}
    if "transforms" in node:
        children = node["transforms"]
        if not isinstance(children, Sequence) or isinstance(children, str):
            raise ConfigError(f"{where}: transforms must be a list of steps, got {children!r:.120}.")
        arguments["transforms"] = [
            _build(child, option, source, [*path, f"step {i} ({_class_name(child)})"])
            for i, child in enumerate(children)
        ]
    try:
        return cls(**arguments)
    except Exception as error:
        raise ConfigError(f"{where}: {name}({_arguments(arguments)}) is misconfigured: {_short(error)}") from None


def _short(error: Exception) -> str:
    """An exception's message on one line, without pydantic's documentation links, at most 300 characters."""
    text = re.sub(r"\s*For further information visit \S+", "", str(error))
    return " ".join(text.split())[:300]


def _class_name(node: Any) -> str:
    return str(node.get("__class_fullname__", "?")) if isinstance(node, Mapping) else type(node).__name__


def _arguments(arguments: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in arguments.items() if k != "transforms")


def check_pipeline_output(
    pipeline: UserPipeline,
    sample: np.ndarray,
    input_shape: tuple[int, int, int],
    mean: Sequence[float],
    std: Sequence[float],
) -> None:
    """Refuse a pipeline that fails on ``sample`` or does not turn it into the model's normalised input tensor.

    Runs copies seeded 0 to 7 on ``sample`` and on a black and a white image of its shape and dtype (white is 255, or
    1.0 for float images). Every output must have the model's shape; the normalisation rules of the module docstring
    hold over all of them (the black / white difference under at least one seed).

    Args:
        pipeline: The pipeline.
        sample: A real image of the split, as the dataset hands it to the transform (``H x W x C``).
        input_shape: ``(channels, height, width)`` the model takes.
        mean: The backbone's normalisation mean (named in the fix).
        std: The backbone's normalisation std.

    Raises:
        ConfigError: What is wrong, the step responsible where one is, and the fix.

    Example:
        >>> pipeline = load_user_pipeline({"transform": {"__class_fullname__": "Compose", "transforms": [
        ...     {"__class_fullname__": "Resize", "height": 8, "width": 8},
        ...     {"__class_fullname__": "ToTensorV2"}]}}, "eval_transform")
        >>> try:
        ...     check_pipeline_output(pipeline, np.zeros((20, 20, 3), np.uint8), (3, 8, 8), (0.5,) * 3, (0.5,) * 3)
        ... except ConfigError as error:
        ...     print(str(error).split(";")[0])
        eval_transform (inline mapping) returns a torch.uint8 tensor
    """
    white = np.full_like(sample, 255 if sample.dtype == np.uint8 else 1)
    runs = [[_run(pipeline, image, seed) for image in (sample, np.zeros_like(sample), white)] for seed in range(_SEEDS)]
    outputs = [output for run in runs for output in run]
    what = f"{pipeline.option} ({pipeline.source})"
    fix = (
        f"end the pipeline with Normalize(mean={tuple(round(v, 4) for v in mean)}, std="
        f"{tuple(round(v, 4) for v in std)}, max_pixel_value={255 if sample.dtype == np.uint8 else 1}) and "
        "ToTensorV2()"
    )
    for output in outputs:
        if not isinstance(output, torch.Tensor):
            raise ConfigError(f"{what} returns a {type(output).__name__}, not a torch tensor; {fix}.")
        if not output.is_floating_point():
            raise ConfigError(f"{what} returns a {output.dtype} tensor; {fix}.")
        if tuple(output.shape) != tuple(input_shape):
            raise ConfigError(
                f"{what} returns a tensor of shape {tuple(output.shape)} (C x H x W) for an image of shape "
                f"{sample.shape}, but the model takes {tuple(input_shape)}: {_size_hint(pipeline, input_shape)}"
            )
        if not bool(torch.isfinite(output).all()):
            raise ConfigError(f"{what} returns NaN or infinite values; check Normalize's std (no zeros).")
    largest = max(float(output.abs().max()) for output in outputs)
    if largest > _MAX_VALUE:
        raise ConfigError(
            f"{what} is not normalised: values reach {largest:.1f} (0-255 pixel values, not divided by 255 and the "
            f"std); {fix}."
        )
    if min(float(output.min()) for output in outputs) >= 0:
        raise ConfigError(
            f"{what} is not normalised: no value is below 0, so the mean was not subtracted (0-1 values?); {fix}."
        )
    contrast = max(abs(float(white_out.mean()) - float(black_out.mean())) for _, black_out, white_out in runs)
    if contrast < _MIN_CONTRAST:
        raise ConfigError(
            f"{what} is not normalised: a white and a black image differ by only {contrast:.3f} on average (pixel "
            f"values divided by 255 twice, e.g. max_pixel_value=255 on float images?); {fix}."
        )


def _run(pipeline: UserPipeline, image: np.ndarray, seed: int) -> Any:
    """The pipeline's output for ``image`` under ``seed``; a failure names the failing step."""
    transform = pipeline.fresh(seed=seed)
    try:
        return transform(image=image.copy())["image"]
    except Exception as error:
        step = _failing_step(pipeline, image, seed)
        where = f" at {step}" if step else ""
        raise ConfigError(
            f"{pipeline.option} ({pipeline.source}) fails{where} on an image of shape {image.shape} ({image.dtype}): "
            f"{type(error).__name__}: {_short(error)}. Fix or remove that step."
        ) from None


def _failing_step(pipeline: UserPipeline, image: np.ndarray, seed: int) -> str | None:
    """Replay the top-level steps one by one on ``image``; the first that raises, as ``step i (Class)``."""
    transform = pipeline.fresh(seed=seed)
    if not isinstance(transform, A.BaseCompose):
        return None
    data: dict[str, Any] = {"image": image.copy()}
    for index, step in enumerate(transform.transforms):
        try:
            data = step(**data, force_apply=True)
        except Exception:
            return f"step {index} ({type(step).__name__})"
    return None


def _size_hint(pipeline: UserPipeline, input_shape: tuple[int, int, int]) -> str:
    """Which step sets the size last, and how to make it the model's."""
    channels, height, width = input_shape
    transform = pipeline.transform
    sizing = [
        f"step {i} ({type(step).__name__})"
        for i, step in enumerate(getattr(transform, "transforms", []))
        if any(hasattr(step, name) for name in ("height", "size", "max_size", "max_size_hw", "min_height"))
    ]
    where = f"the last step that sets the size is {sizing[-1]}; " if sizing else ""
    return (
        f"{where}make it produce {height} x {width} (e.g. end the geometric steps with "
        f"Resize(height={height}, width={width}) or RandomResizedCrop(size=({height}, {width}))), and give images "
        f"of {channels} channel(s) (--data.channels / the model's in_chans)."
    )
