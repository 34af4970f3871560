"""Reading 2-D slices (or 2.5D slice stacks) of NIfTI volumes as ``H x W x C`` ``float32`` arrays in ``[0, 1]``.

Orientation: volumes are first reoriented with ``nibabel.as_closest_canonical``, so their voxel axes follow RAS+
(axis 0: left -> Right, axis 1: posterior -> Anterior, axis 2: inferior -> Superior) whatever the scanner stored.
``axis=2`` therefore gives axial slices, ``axis=1`` coronal and ``axis=0`` sagittal ones, and slice ``k`` is
``canonical[:, :, k]`` (``[:, k, :]``, ``[k]``): plain numpy indexing, no rotation or flip for display.

Intensities are scaled per **volume** (every slice of a volume shares one scale):

* ``scale="percentile"`` (default): the volume's 0.5th and 99.5th percentiles map to 0 and 1 (robust to a few hot
  voxels, as in MR), values outside are clipped;
* ``scale="minmax"``: the volume's minimum and maximum map to 0 and 1;
* ``window=...`` (``scale="window"``): a CT window on the stored values (after ``scl_slope`` / ``scl_inter``), see
  :mod:`cvft.data.medical.windowing`.

The two most recently read volumes are kept in memory, so reading every slice of a volume in turn decodes it once.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from cvft.data.medical._deps import require
from cvft.data.medical.windowing import Window, apply_window, resolve_window, scale_min_max
from cvft.errors import ImageLoadError

__all__ = ["NIFTI_SUFFIXES", "is_nifti_file", "nifti_slices", "read_nifti_slice", "read_nifti_volume"]

NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")
"""File name endings read as NIfTI (lower case)."""

PERCENTILES: tuple[float, float] = (0.5, 99.5)
_SCALES = ("percentile", "minmax", "window")
_CACHE: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
_CACHE_SIZE = 2


def is_nifti_file(path: str | Path) -> bool:
    """Return whether ``path`` ends with ``.nii`` or ``.nii.gz`` (case-insensitive).

    Args:
        path: A file path; the file need not exist.

    Returns:
        ``True`` for NIfTI file names.

    Example:
        >>> is_nifti_file("brain.NII.GZ"), is_nifti_file("scan.dcm")
        (True, False)
    """
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_slices(path: str | Path, axis: int = 2) -> int:
    """Number of slices along ``axis`` of the canonical (RAS+) volume, read from the header only.

    Args:
        path: NIfTI file.
        axis: 0, 1 or 2 (of the canonical orientation, see the module docstring).

    Returns:
        The slice count along ``axis``.

    Raises:
        ImageLoadError: Missing or unreadable file.
        ValueError: ``axis`` is not 0, 1 or 2.
        ImportError: nibabel is not installed.

    Example:
        >>> import os
        >>> from nibabel.testing import data_path
        >>> nifti_slices(os.path.join(data_path, "anatomical.nii"), axis=2)
        25
    """
    nib = require("nibabel", "Reading NIfTI files")
    _check_axis(axis)
    image = _load(Path(path))
    shape = tuple(image.shape[:3]) + (1,) * max(0, 3 - len(image.shape))
    if len(image.shape) < 3:
        return shape[axis]
    orientation = nib.io_orientation(image.affine)
    canonical_shape = [0, 0, 0]
    for stored_axis, (canonical_axis, _) in enumerate(orientation[:3]):
        canonical_shape[int(canonical_axis)] = shape[stored_axis]
    return canonical_shape[axis]


def read_nifti_volume(path: str | Path, volume_index: int = 0) -> np.ndarray:
    """Read one 3-D volume of a NIfTI file in canonical (RAS+) orientation, as stored values (``float32``).

    Args:
        path: NIfTI file (3-D, or 4-D such as fMRI / multi-echo, where ``volume_index`` picks the volume).
        volume_index: Index along the 4th axis; must be 0 for 3-D files.

    Returns:
        ``X x Y x Z`` ``float32`` array after ``scl_slope`` / ``scl_inter`` (a 2-D image gets ``Z = 1``). It is
        shared with the in-memory cache: copy it before writing to it.

    Raises:
        ImageLoadError: Missing, unreadable or more than 4-D file.
        ValueError: ``volume_index`` out of range.
        ImportError: nibabel is not installed.

    Example:
        >>> import os
        >>> from nibabel.testing import data_path
        >>> read_nifti_volume(os.path.join(data_path, "example4d.nii.gz"), volume_index=1).shape
        (128, 96, 24)
    """
    return _volume(Path(path), volume_index)["data"]


def read_nifti_slice(
    path: str | Path,
    slice_index: int | None = None,
    axis: int = 2,
    context: int = 0,
    window: Window = None,
    scale: str | None = None,
    volume_index: int = 0,
) -> np.ndarray:
    """Read slice ``slice_index`` along ``axis`` (with ``context`` neighbours each side) as ``float32`` in ``[0, 1]``.

    Args:
        path: NIfTI file (``.nii`` or ``.nii.gz``).
        slice_index: Slice along ``axis`` of the canonical volume; ``None`` for the middle one (``n // 2``).
        axis: 0 (sagittal), 1 (coronal) or 2 (axial) in RAS+ orientation.
        context: Neighbouring slices each side, stacked as channels (2.5D): channel ``j`` is slice
            ``slice_index - context + j``, indices past either end repeat the edge slice.
        window: A CT window (preset name or ``(center, width)``) on the stored values; implies ``scale="window"``.
        scale: ``"percentile"`` (default without ``window``), ``"minmax"`` or ``"window"`` (see the module
            docstring).
        volume_index: Volume of a 4-D file.

    Returns:
        ``H x W x (2 * context + 1)`` ``float32`` array; ``H, W`` are the two other canonical axes, in order.

    Raises:
        ImageLoadError: Missing or unreadable file.
        ValueError: Bad ``axis``, ``slice_index``, ``context``, ``scale`` / ``window`` combination or
            ``volume_index``.
        ImportError: nibabel is not installed.

    Example:
        >>> import os
        >>> from nibabel.testing import data_path
        >>> image = read_nifti_slice(os.path.join(data_path, "anatomical.nii"), slice_index=0, context=1)
        >>> image.shape, image.dtype, bool(np.array_equal(image[..., 0], image[..., 1]))
        ((33, 41, 3), dtype('float32'), True)
    """
    _check_axis(axis)
    if isinstance(context, bool) or not isinstance(context, (int, np.integer)) or context < 0:
        raise ValueError(f"context must be an integer >= 0 (neighbouring slices each side), got {context!r}.")
    scale = _resolve_scale(scale, window)
    path = Path(path)
    entry = _volume(path, volume_index)
    volume = entry["data"]
    count = volume.shape[axis]
    if slice_index is None:
        slice_index = count // 2
    if isinstance(slice_index, bool) or not isinstance(slice_index, (int, np.integer)) or not 0 <= slice_index < count:
        raise ValueError(
            f"slice_index={slice_index!r} is out of range for axis {axis} of {path}, which has {count} slices: "
            f"use 0..{count - 1} (or None for the middle slice)."
        )
    indices = np.clip(np.arange(slice_index - context, slice_index + context + 1), 0, count - 1)
    stack = np.moveaxis(np.take(volume, indices, axis=axis), axis, -1)
    if scale == "window":
        return np.ascontiguousarray(apply_window(stack, *resolve_window(window)))
    low, high = _intensity_range(entry, scale)
    return np.ascontiguousarray(scale_min_max(stack, low, high))


def _check_axis(axis: int) -> None:
    if isinstance(axis, bool) or axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0 (sagittal), 1 (coronal) or 2 (axial), got {axis!r}.")


def _resolve_scale(scale: str | None, window: Window) -> str:
    if scale is None:
        return "percentile" if window is None else "window"
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}.")
    if (scale == "window") != (window is not None):
        raise ValueError(
            "scale='window' and a window go together: pass window=<preset or (center, width)> with scale=None or "
            f"'window', or window=None with scale='percentile' / 'minmax' (got scale={scale!r}, window={window!r})."
        )
    return scale


def _load(path: Path) -> Any:
    nib = require("nibabel", "Reading NIfTI files")
    if not path.is_file():
        raise ImageLoadError(f"NIfTI file {path} does not exist. Check the path, or remove the entry that names it.")
    try:
        return nib.load(path)
    except Exception as error:  # ImageFileError, gzip / header errors ...
        raise ImageLoadError(
            f"Cannot read NIfTI file {path} ({type(error).__name__}: {error}). Re-export it, or remove it."
        ) from error


def _volume(path: Path, volume_index: int) -> dict[str, Any]:
    stat = path.stat() if path.is_file() else None
    key = (str(path.resolve()), stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0, volume_index)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    nib = require("nibabel", "Reading NIfTI files")
    image = _load(path)
    shape = tuple(image.shape)
    while len(shape) > 4 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 4:
        raise ImageLoadError(f"NIfTI file {path} is {len(shape)}-D {shape}; cvft reads 2-D, 3-D and 4-D volumes.")
    volumes = shape[3] if len(shape) == 4 else 1
    if isinstance(volume_index, bool) or not isinstance(volume_index, (int, np.integer)):
        raise ValueError(f"volume_index must be an integer, got {volume_index!r}.")
    if not 0 <= volume_index < volumes:
        raise ValueError(
            f"volume_index={volume_index} is out of range for {path} ({volumes} volume(s)): use 0..{volumes - 1}."
        )
    try:
        if len(shape) >= 3:
            image = nib.as_closest_canonical(image)
        proxy = image.dataobj
        if len(image.shape) > len(shape):  # trailing singleton dimensions
            proxy = np.asarray(proxy).reshape(image.shape[: len(shape)])
        data = proxy[..., volume_index] if len(shape) == 4 else proxy
        data = np.asarray(data, dtype=np.float32)
        data = np.ascontiguousarray(data[:, :, None] if data.ndim == 2 else data)
    except Exception as error:
        raise ImageLoadError(f"NIfTI file {path} is corrupt or truncated ({type(error).__name__}: {error}).") from error
    data.setflags(write=False)
    entry: dict[str, Any] = {"data": data}
    _CACHE[key] = entry
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return entry


def _intensity_range(entry: dict[str, Any], scale: str) -> tuple[float, float]:
    if scale not in entry:
        values = entry["data"]
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            entry[scale] = (0.0, 0.0)
        elif scale == "minmax":
            entry[scale] = (float(finite.min()), float(finite.max()))
        else:
            low, high = np.percentile(finite, PERCENTILES)
            entry[scale] = (float(low), float(high))
    return entry[scale]
