"""Reading DICOM files into ``H x W x C`` ``float32`` arrays in ``[0, 1]``.

The pipeline for grayscale images (``MONOCHROME1`` / ``MONOCHROME2``):

1. **Decode** the stored values with pydicom (compressed transfer syntaxes need a decoding plugin: when it is
   missing the error names it: ``pylibjpeg`` or ``python-gdcm``).
2. **Modality LUT**: ``value = stored * RescaleSlope + RescaleIntercept`` (Hounsfield units for CT), computed here
   from the tags (defaults 1 and 0; enhanced multi-frame files take them from their functional groups). A
   *Modality LUT Sequence*, when present, is applied by pydicom's ``apply_modality_lut`` instead.
3. **Window** to ``[0, 1]`` with cvft's linear window (:func:`~cvft.data.medical.windowing.apply_window`):

   * a preset name (``"lung"``, ``"bone"``, ...) or a ``(center, width)`` pair;
   * ``"dicom"``: the file's own *WindowCenter* / *WindowWidth* (the first value when several are stored);
   * ``None``: min-max of the decoded image (of all selected frames together), so the full range is kept.

   *VOI LUT Sequence* and non-linear *VOILUTFunction* values are not applied.
4. ``MONOCHROME1`` (white = low values, common for X-ray) is inverted (``1 - x``) **after** windowing, so bone is
   bright in every output.

Colour images (``RGB``, ``YBR_*``, converted to RGB by pydicom, and ``PALETTE COLOR``, expanded through its
palette) are divided by the largest stored value (``2 ** BitsStored - 1``); windows do not apply to them.

Multi-frame files need ``frame``: an index picks one frame, ``"all"`` stacks every (grayscale) frame as channels
(2.5D input), and ``frame=None`` raises rather than silently picking one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from cvft.data.medical._deps import require
from cvft.data.medical.windowing import Window, apply_window, resolve_window, scale_min_max
from cvft.errors import CvftError, DatasetError, ImageLoadError

__all__ = ["is_dicom_file", "read_dicom", "dicom_frame_count"]

_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422")
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PLUGIN_FIX = (
    "Install a decoder plugin for pydicom: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (JPEG, "
    "JPEG-LS, JPEG 2000), or pip install python-gdcm (gdcm), or decompress the file first (gdcmconv --raw)."
)


def is_dicom_file(path: str | Path) -> bool:
    """Return whether ``path`` starts with the DICOM preamble (128 bytes then ``DICM``), whatever its suffix.

    Args:
        path: Any file; missing or unreadable files give ``False``.

    Returns:
        ``True`` for a DICOM Part 10 file.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "IM0001"
        >>> _ = path.write_bytes(bytes(128) + b"DICM" + bytes(8))
        >>> is_dicom_file(path), is_dicom_file(path.with_name("missing"))
        (True, False)
    """
    try:
        with open(path, "rb") as handle:
            header = handle.read(132)
    except OSError:
        return False
    return len(header) == 132 and header[128:132] == b"DICM"


def dicom_frame_count(path: str | Path) -> int:
    """Number of frames in a DICOM file (*NumberOfFrames*, 1 when absent), read without decoding pixels.

    Args:
        path: DICOM file.

    Returns:
        The frame count, at least 1.

    Raises:
        ImageLoadError: The file is missing or not DICOM.
        ImportError: pydicom is not installed.

    Example:
        >>> from pydicom.data import get_testdata_file
        >>> dicom_frame_count(get_testdata_file("CT_small.dcm")), dicom_frame_count(get_testdata_file("rtdose.dcm"))
        (1, 15)
    """
    dataset = _read_dataset(Path(path), stop_before_pixels=True)
    return _frame_count(dataset)


def read_dicom(path: str | Path, window: Window = None, frame: int | str | None = None) -> np.ndarray:
    """Read a DICOM image as ``float32`` ``H x W x C`` in ``[0, 1]`` (see the module docstring for each step).

    Args:
        path: DICOM file.
        window: ``None`` (min-max of the image), a preset name from
            :data:`~cvft.data.medical.windowing.WINDOW_PRESETS`, a ``(center, width)`` pair in the image's output
            units (Hounsfield units for CT), or ``"dicom"`` for the file's own *WindowCenter* / *WindowWidth*.
            Grayscale images only.
        frame: For multi-frame files: a frame index (``0 <= frame < NumberOfFrames``), or ``"all"`` to stack every
            frame as channels. ``None`` is allowed for single-frame files only.

    Returns:
        ``H x W x 1`` for a grayscale frame, ``H x W x F`` for ``frame="all"``, ``H x W x 3`` for colour images.

    Raises:
        ImageLoadError: Missing, non-DICOM, corrupt or truncated file, no pixel data, or a compressed transfer
            syntax whose decoding plugin is not installed (the message names it).
        DatasetError: ``window="dicom"`` on a file without *WindowCenter* / *WindowWidth*.
        ValueError: Bad ``window`` or ``frame`` (the message says what to pass), ``frame=None`` on a multi-frame
            file, or a window on a colour image.
        ImportError: pydicom is not installed.

    Example:
        >>> from pydicom.data import get_testdata_file
        >>> image = read_dicom(get_testdata_file("CT_small.dcm"), window="mediastinum")
        >>> image.shape, image.dtype, float(image.min()) >= 0.0, float(image.max()) <= 1.0
        ((128, 128, 1), dtype('float32'), True, True)
    """
    path = Path(path)
    dataset = _read_dataset(path)
    with _corrupt_tags_raise(path):
        if not any(tag in dataset for tag in _PIXEL_TAGS):
            raise ImageLoadError(
                f"DICOM file {path} has no pixel data (SOP class {dataset.get('SOPClassUID', 'unknown')}, e.g. a "
                "report or RT plan). Remove it from the image list."
            )
        count = _frame_count(dataset)
        photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    indices = _frame_indices(frame, count, path)
    colour = photometric in _COLOUR or photometric == "PALETTE COLOR"
    if colour:
        _check_colour_options(window, len(indices), photometric, path)
    resolved = None if colour or window == "dicom" else resolve_window(window)
    stored = [_decode(dataset, index, path) for index in indices]
    with _corrupt_tags_raise(path):  # tag values are parsed lazily: a corrupt one fails here, not in dcmread
        if colour:
            return _colour(dataset, stored[0], photometric)
        values = np.stack(
            [_modality_lut(dataset, pixels, index) for pixels, index in zip(stored, indices, strict=True)], axis=-1
        )
        if window == "dicom":
            image = apply_window(values, *_file_window(dataset, indices[0], path))
        else:
            image = scale_min_max(values) if resolved is None else apply_window(values, *resolved)
    if photometric == "MONOCHROME1":
        image = 1.0 - image
    return np.ascontiguousarray(image, dtype=np.float32)


@contextmanager
def _corrupt_tags_raise(path: Path) -> Iterator[None]:
    """Turn a failure to parse or use a tag value into an ImageLoadError naming the file (cvft errors pass)."""
    try:
        yield
    except CvftError:
        raise
    except Exception as error:  # pydicom parses values on access: ValueError, NotImplementedError (unknown VR) ...
        raise ImageLoadError(
            f"DICOM file {path} has a corrupt tag value ({type(error).__name__}: {error}). Re-export it, or remove it."
        ) from error


def _read_dataset(path: Path, stop_before_pixels: bool = False) -> Any:
    pydicom = require("pydicom", "Reading DICOM files")
    if not path.is_file():
        raise ImageLoadError(f"DICOM file {path} does not exist. Check the path, or remove the entry that names it.")
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except pydicom.errors.InvalidDicomError as error:
        raise ImageLoadError(
            f"{path} is not a DICOM file (no 'DICM' preamble / file meta header): {error}. Convert it to a DICOM "
            "Part 10 file, or remove it."
        ) from error
    except Exception as error:  # pydicom raises EOFError, OSError, ValueError ... for broken files
        raise ImageLoadError(
            f"DICOM file {path} is corrupt or truncated ({type(error).__name__}: {error}). Re-export it, or remove it."
        ) from error


def _frame_count(dataset: Any) -> int:
    try:
        return max(1, int(dataset.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _frame_indices(frame: int | str | None, count: int, path: Path) -> list[int]:
    if frame is None:
        if count > 1:
            raise ValueError(
                f"DICOM file {path} has {count} frames: pass frame=<index in 0..{count - 1}> to read one, or "
                "frame='all' to stack every frame as channels (2.5D input)."
            )
        return [0]
    if isinstance(frame, str):
        if frame.lower() == "all":
            return list(range(count))
        raise ValueError(f"frame must be an integer index, 'all' or None, got {frame!r}.")
    if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)) or not 0 <= int(frame) < count:
        raise ValueError(f"frame={frame!r} is out of range for {path}, which has {count} frame(s): use 0..{count - 1}.")
    return [int(frame)]


def _decode(dataset: Any, index: int, path: Path) -> np.ndarray:
    from pydicom.pixels import pixel_array

    syntax = dataset.file_meta.get("TransferSyntaxUID") if hasattr(dataset, "file_meta") else None
    try:
        return pixel_array(dataset, index=index if _frame_count(dataset) > 1 else None)
    except (RuntimeError, NotImplementedError) as error:
        name = getattr(syntax, "name", syntax)
        raise ImageLoadError(
            f"Cannot decode the pixel data of {path} (transfer syntax {name}): {' '.join(str(error).split())}. "
            f"{_PLUGIN_FIX}"
        ) from error
    except Exception as error:  # truncated pixel data, inconsistent group 0028 tags ...
        raise ImageLoadError(
            f"DICOM file {path} has corrupt or truncated pixel data ({type(error).__name__}: {error}). "
            "Re-export it, or remove it."
        ) from error


def _frame_attribute(dataset: Any, index: int, sequence: str, name: str) -> Any:
    """An attribute from the top level, else this frame's functional group, else the shared functional group."""
    if name in dataset:
        return dataset[name].value
    for groups, position in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        items = dataset.get(groups)
        if items is not None and len(items) > position:
            inner = items[position].get(sequence)
            if inner is not None and len(inner) and name in inner[0]:
                return inner[0][name].value
    return None


def _modality_lut(dataset: Any, pixels: np.ndarray, index: int) -> np.ndarray:
    if "ModalityLUTSequence" in dataset:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(pixels, dataset), dtype=np.float64)
    slope = _frame_attribute(dataset, index, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _frame_attribute(dataset, index, "PixelValueTransformationSequence", "RescaleIntercept")
    slope = 1.0 if slope is None else float(slope)
    intercept = 0.0 if intercept is None else float(intercept)
    return pixels.astype(np.float64) * slope + intercept


def _first(value: Any) -> float:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _file_window(dataset: Any, index: int, path: Path) -> tuple[float, float]:
    center = _frame_attribute(dataset, index, "FrameVOILUTSequence", "WindowCenter")
    width = _frame_attribute(dataset, index, "FrameVOILUTSequence", "WindowWidth")
    if center is None or width is None or center == "" or width == "":
        raise DatasetError(
            f"window='dicom' needs WindowCenter/WindowWidth, which {path} does not store. Pass a preset "
            "(e.g. window='soft_tissue'), a (center, width) pair, or window=None for the image's full range."
        )
    center, width = _first(center), _first(width)
    if width <= 0:
        raise DatasetError(f"{path} stores WindowWidth={width}, which is not positive. Pass a window explicitly.")
    return center, width


def _check_colour_options(window: Window, frames: int, photometric: str, path: Path) -> None:
    if window not in (None, "dicom"):
        raise ValueError(
            f"{path} is a colour DICOM ({photometric}): intensity windows apply to grayscale images only. "
            "Pass window=None."
        )
    if frames > 1:
        raise ValueError(
            f"frame='all' stacks grayscale frames only; {path} is colour ({photometric}). Pass a frame index."
        )


def _colour(dataset: Any, pixels: np.ndarray, photometric: str) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        pixels = apply_color_lut(pixels, dataset)
        peak = float(np.iinfo(pixels.dtype).max) if np.issubdtype(pixels.dtype, np.integer) else 1.0
    else:
        peak = float(2 ** int(dataset.get("BitsStored", 8) or 8) - 1)
    return np.ascontiguousarray(np.clip(pixels.astype(np.float64) / peak, 0.0, 1.0), dtype=np.float32)
