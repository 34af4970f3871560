"""Checking the numeric and named options of cvft's DataModules in their constructors, one rule per option name.

A wrong value fails at construction with a :class:`~cvft.errors.ConfigError` naming the option, the value given and
the allowed range, instead of surfacing later as a torch traceback (or, for ``image_size=0``, not at all). Split
fractions raise :class:`~cvft.errors.DatasetError`, as :func:`~cvft.data.split.stratified_split` does for them.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cvft.errors import ConfigError, DatasetError

__all__ = ["validate_options"]


def _integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _at_least(minimum: int, optional: bool = False) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if value is None and optional:
            return
        if not _integer(value) or value < minimum:
            allowed = f"an integer >= {minimum}" + (" or None" if optional else "")
            raise ConfigError(f"{name} must be {allowed}, got {value!r}. Pass e.g. --data.{name} {max(minimum, 1)}.")

    return check


def _fraction(upper_inclusive: bool, error: type[Exception] = ConfigError) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        real = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not real or not (0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0):
            allowed = "0 <= value <= 1" if upper_inclusive else "0 <= value < 1"
            raise error(f"{name} must be a number with {allowed}, got {value!r}.")

    return check


def _image_size(name: str, value: Any) -> None:
    if value is None:
        return
    sides = [value] if not isinstance(value, Sequence) or isinstance(value, str) else list(value)
    if len(sides) not in (1, 2) or not all(_integer(side) and side >= 1 for side in sides):
        raise ConfigError(
            f"{name} must be a positive number of pixels (e.g. 224) or a (height, width) pair, got {value!r}. "
            "Leave it out to use the backbone's pretrained size."
        )


_RULES: dict[str, Callable[[str, Any], None]] = {
    "image_size": _image_size,
    "batch_size": _at_least(1),
    "num_workers": _at_least(0, optional=True),
    "channels": _at_least(1),
    "context": _at_least(0),
    "batches_per_epoch": _at_least(1, optional=True),
    "val_fraction": _fraction(upper_inclusive=False, error=DatasetError),  # as stratified_split raises
    "test_fraction": _fraction(upper_inclusive=False, error=DatasetError),
    "min_visibility": _fraction(upper_inclusive=True),
}


def validate_options(choices: Mapping[str, tuple[Any, Sequence[Any]]] | None = None, **values: Any) -> None:
    """Check DataModule options by name; the first bad one raises.

    Args:
        choices: Option name -> ``(value, allowed values)`` for named options (``augment``, ``check_images`` ...).
        **values: Numeric options, each checked by the rule of its name: ``image_size`` (None, ``>= 1`` or a ``(height,
            width)`` pair), ``batch_size`` (``>= 1``), ``num_workers`` (None or ``>= 0``), ``channels`` (``>= 1``),
            ``context`` (``>= 0``), ``batches_per_epoch`` (None or ``>= 1``), ``val_fraction`` / ``test_fraction``
            (``[0, 1)``, summing below 1) and ``min_visibility`` (``[0, 1]``).

    Raises:
        ConfigError: An option is out of range or not one of its choices, naming it, the value and the range.
        DatasetError: A split fraction is out of range, or the fractions leave no training images.
        KeyError: An option name without a rule (a programming error).

    Example:
        >>> validate_options(image_size=224, batch_size=8, choices={"augment": ("light", ("none", "light"))})
        >>> try:
        ...     validate_options(image_size=0)
        ... except ConfigError as error:
        ...     print(str(error).split(", got")[0])
        image_size must be a positive number of pixels (e.g. 224) or a (height, width) pair
    """
    for name, value in values.items():
        _RULES[name](name, value)
    total = float(values.get("val_fraction", 0.0)) + float(values.get("test_fraction", 0.0))
    if total >= 1.0:
        raise DatasetError(
            f"val_fraction + test_fraction must be below 1 so that training images remain, got "
            f"{values.get('val_fraction', 0.0)} + {values.get('test_fraction', 0.0)} = {total:g}."
        )
    for name, (value, allowed) in (choices or {}).items():
        if value not in allowed:
            raise ConfigError(f"Unknown {name} {value!r}; choose one of {', '.join(map(str, allowed))}.")
