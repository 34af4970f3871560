"""Range checks of the tasks' numeric hyper-parameters, run in their constructors before anything is built.

A bad value (``--model.lr -0.1``) must fail while the command line is read, naming the option, the value and the
allowed range, not later inside the optimizer after a run folder was made. Options mean the same in every task, so
their ranges are written once, in :data:`RANGES`; a task passes its values and overrides only what differs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cvft.errors import ConfigError

__all__ = ["Interval", "RANGES", "check_hparams"]


@dataclass(frozen=True)
class Interval:
    """The finite numbers from ``low`` to ``high``; each end is open (excluded) or closed (included).

    Args:
        low: Lower end (``-inf``: none).
        high: Upper end (``inf``: none).
        low_open: Exclude ``low`` itself.
        high_open: Exclude ``high`` itself.
        integer: Only integers (``bool`` is never a number here).
        hint: What to do instead, appended to the error message.

    Example:
        >>> rate = Interval(0.0, 1.0, high_open=True)
        >>> 0.0 in rate, 1.0 in rate, float("nan") in rate, str(rate)
        (True, False, False, 'in [0, 1)')
        >>> str(Interval(1, integer=True))
        'an integer >= 1'
    """

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    hint: str = ""

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.integer and not isinstance(value, numbers.Integral):
            return False
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        kind = "an integer " if self.integer else ""
        if math.isinf(self.high):
            return f"{kind}{'>' if self.low_open else '>='} {self.low:g}"
        if math.isinf(self.low):
            return f"{kind}{'<' if self.high_open else '<='} {self.high:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"{kind}in {left}{self.low:g}, {self.high:g}{right}"


_POSITIVE = Interval(0.0, low_open=True)
_NON_NEGATIVE = Interval(0.0)
_BELOW_ONE = Interval(0.0, 1.0, high_open=True)

#: Allowed values of the numeric options the tasks share, by option name. Sequence options (``pos_weight``,
#: ``anchor_sizes``) are checked value by value. ``num_classes`` is a classifier's (torchmetrics' multi-label metrics
#: need two labels too); a detector counts object classes without background and passes its own range.
RANGES: dict[str, Interval] = {
    "num_classes": Interval(
        2,
        integer=True,
        hint="A single yes/no label is a two-class single-label task: num_classes=2, multi_label=False.",
    ),
    "in_chans": Interval(1, integer=True),
    "lr": _POSITIVE,
    "weight_decay": _NON_NEGATIVE,
    "momentum": _BELOW_ONE,
    "warmup_epochs": _NON_NEGATIVE,
    "min_lr_ratio": Interval(0.0, 1.0),
    "drop_path_rate": _BELOW_ONE,
    "drop_rate": _BELOW_ONE,
    "drop_path_epochs": Interval(
        0.0, low_open=True, hint="Leave drop_path_epochs unset unless drop_path_schedule='early'."
    ),
    "label_smoothing": _BELOW_ONE,
    "pos_weight": _NON_NEGATIVE,
    "focal_gamma": _NON_NEGATIVE,
    "head_lr_scale": _POSITIVE,
    "mixup": _NON_NEGATIVE,
    "cutmix": _NON_NEGATIVE,
    "mix_prob": Interval(0.0, 1.0),
    "mix_switch_prob": Interval(0.0, 1.0),
    "mix_off_epoch": Interval(1, integer=True, hint="Leave mix_off_epoch unset to mix every epoch."),
    "anchor_sizes": _POSITIVE,
    "aspect_ratios": _POSITIVE,
    "ema_decay": Interval(
        0.0, 1.0, low_open=True, high_open=True, hint="0.999 averages over about 1,000 steps, 0.99 over about 100."
    ),
}


def check_hparams(
    owner: str, values: Mapping[str, Any], ranges: Mapping[str, Interval] | None = None, flag_prefix: str = "--model."
) -> None:
    """Refuse the first value outside its allowed range; ``None`` (an option left unset) always passes.

    Args:
        owner: Who takes the options, for the message (``"ImageClassifier"``).
        values: Option name to value; a list or tuple is checked value by value.
        ranges: Ranges that replace or extend :data:`RANGES` for this call.
        flag_prefix: How the options are spelled on the command line, for the message (``--trainer.``).

    Raises:
        ConfigError: A value is out of range, not a finite number, or (integer options) not an integer.
        KeyError: An option without a known range (a programming error, not a user's).

    Example:
        >>> check_hparams("ImageClassifier", {"lr": 3e-4, "drop_path_rate": None, "pos_weight": [1.0, 2.0]})
        >>> check_hparams("ImageClassifier", {"lr": -0.1})
        Traceback (most recent call last):
        ...
        cvft.errors.ConfigError: ImageClassifier: lr=-0.1 is out of range; lr must be > 0. Pass a value in that range (on the command line: --model.lr).
    """  # noqa: E501
    table = {**RANGES, **(ranges or {})}
    for name, value in values.items():
        if value is None:
            continue
        allowed = table[name]
        if isinstance(value, Sequence) and not isinstance(value, str):
            bad = [item for item in value if item not in allowed]
            if not bad:
                continue
            problem = f"{name}={list(value)!r} holds {bad[0]!r}, out of range; every value of {name} must be {allowed}"
        elif value in allowed:
            continue
        else:
            problem = f"{name}={value!r} is out of range; {name} must be {allowed}"
        hint = f" {allowed.hint}" if allowed.hint else ""
        raise ConfigError(
            f"{owner}: {problem}.{hint} Pass a value in that range (on the command line: {flag_prefix}{name})."
        )
