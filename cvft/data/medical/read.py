"""One entry point for every medical image format: :func:`read_medical_image`.

The format is chosen from the file name, and from the content for DICOM files without a suffix:

============================================== ==================================================================
file                                           reader
============================================== ==================================================================
``.dcm``, ``.dicom``, or ``DICM`` preamble     :func:`~cvft.data.medical.dicom.read_dicom`
``.nii``, ``.nii.gz``                          :func:`~cvft.data.medical.nifti.read_nifti_slice`
``.png``, ``.tif``, ``.tiff``                  :func:`~cvft.data.medical.raster.read_raster` (16-bit kept)
other image suffixes (``.jpg``, ``.bmp`` ...)  :func:`cvft.data.io.load_image`, divided by 255
============================================== ==================================================================

Every reader returns ``float32`` ``H x W x C`` in ``[0, 1]`` (C = 1 for grayscale, 3 for colour, ``2 * context + 1``
for a NIfTI 2.5D stack, the frame count for DICOM ``frame="all"``). An option that does not apply to the file's
format (``frame`` on a PNG, ``slice_index`` on a DICOM ...) raises instead of being ignored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cvft.data.io import IMAGE_SUFFIXES, load_image
from cvft.data.medical.dicom import is_dicom_file, read_dicom
from cvft.data.medical.nifti import is_nifti_file, read_nifti_slice
from cvft.data.medical.raster import RASTER_SUFFIXES, read_raster
from cvft.data.medical.windowing import Window, apply_window, resolve_window, scale_min_max
from cvft.errors import ImageLoadError

__all__ = ["DICOM_SUFFIXES", "MEDICAL_SUFFIXES", "is_medical_image_file", "medical_image_format", "read_medical_image"]

DICOM_SUFFIXES: frozenset[str] = frozenset({".dcm", ".dicom"})
MEDICAL_SUFFIXES: frozenset[str] = frozenset(DICOM_SUFFIXES | {".nii", ".nii.gz"} | IMAGE_SUFFIXES)
"""Suffixes (lower case) :func:`read_medical_image` reads; DICOM files without a suffix are found by content."""


def medical_image_format(path: str | Path) -> str:
    """The reader :func:`read_medical_image` uses for ``path``: ``"dicom"``, ``"nifti"``, ``"raster"`` or ``"image"``.

    Args:
        path: An image file (a suffix-less file is read for the DICOM preamble).

    Returns:
        The format name.

    Raises:
        ImageLoadError: The suffix is not a supported one and the file is not DICOM.

    Example:
        >>> medical_image_format("ct/slice.DCM"), medical_image_format("brain.nii.gz"), medical_image_format("a.tif")
        ('dicom', 'nifti', 'raster')
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    if is_nifti_file(path):
        return "nifti"
    if suffix in RASTER_SUFFIXES:
        return "raster"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if is_dicom_file(path):
        return "dicom"
    raise ImageLoadError(
        f"Cannot tell the format of {path}: suffix {suffix or '(none)'!r} is not one of {sorted(MEDICAL_SUFFIXES)} "
        "and the file has no DICOM preamble. Rename it with its format's suffix, or remove it."
    )


def is_medical_image_file(path: str | Path) -> bool:
    """Return whether :func:`read_medical_image` would read ``path`` (by suffix, else by DICOM preamble).

    Args:
        path: A file path.

    Returns:
        ``True`` for DICOM, NIfTI and image files.

    Example:
        >>> is_medical_image_file("scan.nii.gz"), is_medical_image_file("labels.csv")
        (True, False)
    """
    try:
        medical_image_format(path)
    except ImageLoadError:
        return False
    return True


def read_medical_image(
    path: str | Path,
    *,
    window: Window = None,
    slice_index: int | None = None,
    axis: int = 2,
    context: int = 0,
    frame: int | str | None = None,
    scale: str | None = None,
    volume_index: int = 0,
) -> np.ndarray:
    """Read any supported medical image as ``float32`` ``H x W x C`` in ``[0, 1]``.

    Args:
        path: DICOM, NIfTI, PNG / TIFF (8 or 16 bit) or other image file.
        window: Intensity window: a preset (``"lung"``, ``"mediastinum"``, ``"bone"``, ``"brain"``,
            ``"soft_tissue"``), a ``(center, width)`` pair, ``"dicom"`` (DICOM only: the file's own window) or
            ``None`` for the full range (DICOM: min-max; NIfTI: ``scale``; PNG / TIFF: ``value / dtype max``).
        slice_index: NIfTI only: slice along ``axis`` (``None``: the middle one).
        axis: NIfTI only: 0, 1 or 2 of the canonical RAS+ volume.
        context: NIfTI only: neighbouring slices each side stacked as channels (2.5D).
        frame: DICOM only: frame index, ``"all"`` or ``None`` (single-frame files).
        scale: NIfTI: ``"percentile"`` / ``"minmax"`` / ``"window"``; PNG / TIFF / other images: ``"dtype"`` /
            ``"minmax"``. ``None``: the format's default.
        volume_index: NIfTI only: volume of a 4-D file.

    Returns:
        ``float32`` array ``H x W x C`` with values in ``[0, 1]``.

    Raises:
        ImageLoadError: Unknown format, or a missing / corrupt file.
        ValueError: An option that does not apply to the file's format, or a bad option value.
        ImportError: pydicom / nibabel missing for a DICOM / NIfTI file.

    Example:
        >>> from pydicom.data import get_testdata_file
        >>> read_medical_image(get_testdata_file("CT_small.dcm"), window="lung").shape
        (128, 128, 1)
    """
    kind = medical_image_format(path)
    given = {
        "slice_index": slice_index is not None,
        "axis": axis != 2,
        "context": context != 0,
        "frame": frame is not None,
        "volume_index": volume_index != 0,
        "scale": scale is not None,
    }
    allowed = {
        "dicom": {"frame"},
        "nifti": {"slice_index", "axis", "context", "volume_index", "scale"},
        "raster": {"scale"},
        "image": {"scale"},
    }[kind]
    misplaced = sorted(name for name, used in given.items() if used and name not in allowed)
    if misplaced:
        raise ValueError(
            f"Option(s) {misplaced} do not apply to {kind} file {path}; {kind} files take "
            f"{sorted(allowed | {'window'})}. Leave them at their defaults for this file."
        )
    if kind == "dicom":
        return read_dicom(path, window=window, frame=frame)
    if kind == "nifti":
        return read_nifti_slice(
            path, slice_index=slice_index, axis=axis, context=context, window=window, scale=scale,
            volume_index=volume_index,
        )  # fmt: skip
    if kind == "raster":
        return read_raster(path, window=window, scale=scale or "dtype")
    return _read_8bit(Path(path), window, scale or "dtype")


def _read_8bit(path: Path, window: Window, scale: str) -> np.ndarray:
    if scale not in ("dtype", "minmax"):
        raise ValueError(f"scale must be 'dtype' or 'minmax' for {path}, got {scale!r}.")
    pixels = load_image(path, channels=3)
    if np.array_equal(pixels[:, :, :1], pixels[:, :, 1:2]) and np.array_equal(pixels[:, :, :1], pixels[:, :, 2:]):
        pixels = pixels[:, :, :1]  # grayscale stored as RGB: one channel, as the contract asks
    resolved = resolve_window(window)
    if resolved is not None:
        return apply_window(pixels, *resolved)
    if scale == "minmax":
        return scale_min_max(pixels)
    return pixels.astype(np.float32) / np.float32(255.0)
