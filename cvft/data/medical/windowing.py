"""Intensity windows: mapping Hounsfield units (or any raw values) to ``[0, 1]``.

A window is a ``(center, width)`` pair. cvft uses the **linear** window

    ``x = clip((v - (center - width / 2)) / width, 0, 1)``

so ``center - width / 2`` maps to 0, ``center + width / 2`` to 1 and ``center`` to 0.5. (DICOM PS3.3 C.11.2.1.2
defines a variant with half-unit offsets, ``(v - (c - 0.5)) / (w - 1) + 0.5``, meant for integer display values; the
two differ by less than ``1 / width`` and cvft does not use it, so the same window gives the same numbers on every
format.)

The presets are the usual CT window centre / width values in Hounsfield units (Radiopaedia, "Windowing (CT)",
https://radiopaedia.org/articles/windowing-ct; the same numbers appear in most radiology teaching material):

=============== ======== =======
name            center   width
=============== ======== =======
``lung``        -600     1500
``mediastinum`` 50       350
``bone``        400      1800
``brain``       40       80
``soft_tissue`` 50       400
=============== ======== =======
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["WINDOW_PRESETS", "Window", "apply_window", "resolve_window", "scale_min_max"]

Window = str | tuple[float, float] | Sequence[float] | None
"""A window option: a preset name, a ``(center, width)`` pair, or ``None`` (no window: full range)."""

WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "soft_tissue": (50.0, 400.0),
}
"""CT windows ``name -> (center, width)`` in Hounsfield units (see the module docstring for the source)."""


def resolve_window(window: Window) -> tuple[float, float] | None:
    """Turn a window option into a ``(center, width)`` pair.

    Args:
        window: A preset name from :data:`WINDOW_PRESETS` (case-insensitive, ``-`` or space accepted for ``_``),
            a ``(center, width)`` pair with ``width > 0``, or ``None``.

    Returns:
        ``(center, width)`` as floats, or ``None`` when ``window`` is ``None``.

    Raises:
        ValueError: Unknown preset name (the message lists the presets), a pair that is not two finite numbers, or
            a width that is not positive.

    Example:
        >>> resolve_window("lung"), resolve_window((40, 80)), resolve_window(None)
        ((-600.0, 1500.0), (40.0, 80.0), None)
    """
    if window is None:
        return None
    if isinstance(window, str):
        key = window.strip().lower().replace("-", "_").replace(" ", "_")
        if key in WINDOW_PRESETS:
            return WINDOW_PRESETS[key]
        hint = " 'dicom' (the file's own window) applies to DICOM files only." if key == "dicom" else ""
        raise ValueError(
            f"Unknown window {window!r}. Use one of {sorted(WINDOW_PRESETS)}, a (center, width) pair such as "
            f"(40, 80), or None for the full intensity range.{hint}"
        )
    try:
        center, width = (float(value) for value in window)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"A window must be a preset name {sorted(WINDOW_PRESETS)} or a (center, width) pair of numbers, "
            f"got {window!r}."
        ) from error
    if not (np.isfinite(center) and np.isfinite(width)) or width <= 0:
        raise ValueError(f"Window (center={center}, width={width}) needs finite values and width > 0.")
    return center, width


def apply_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map raw values through the linear window ``clip((v - (center - width / 2)) / width, 0, 1)``.

    Args:
        values: Raw intensities (for CT: Hounsfield units after rescale slope / intercept), any shape.
        center: Window centre (level).
        width: Window width, ``> 0``.

    Returns:
        ``float32`` array of the same shape with values in ``[0, 1]`` (NaN becomes 0).

    Raises:
        ValueError: ``width`` is not positive.

    Example:
        >>> apply_window(np.array([-1000.0, 40.0, 60.0, 1000.0]), center=40, width=80).tolist()
        [0.0, 0.5, 0.75, 1.0]
    """
    if not width > 0:
        raise ValueError(f"Window width must be > 0, got {width}.")
    low = float(center) - float(width) / 2.0
    scaled = (np.asarray(values, dtype=np.float64) - low) / float(width)
    return np.clip(np.nan_to_num(scaled, nan=0.0), 0.0, 1.0).astype(np.float32)


def scale_min_max(values: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Scale values linearly so ``low -> 0`` and ``high -> 1`` (defaults: the array's min and max), clipped.

    A constant array (``high == low``) gives zeros.

    Args:
        values: Raw intensities, any shape.
        low: Value mapped to 0; ``None`` for the array's minimum (NaN ignored).
        high: Value mapped to 1; ``None`` for the array's maximum (NaN ignored).

    Returns:
        ``float32`` array of the same shape with values in ``[0, 1]``.

    Example:
        >>> scale_min_max(np.array([10, 15, 30])).tolist()
        [0.0, 0.25, 1.0]
    """
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.float32)
    low = float(finite.min()) if low is None else float(low)
    high = float(finite.max()) if high is None else float(high)
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    scaled = np.nan_to_num((values - low) / (high - low), nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)
