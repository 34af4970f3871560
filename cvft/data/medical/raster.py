"""Reading 8- and 16-bit PNG and TIFF files at full precision as ``H x W x C`` ``float32`` arrays in ``[0, 1]``.

:func:`cvft.data.io.load_image` gives 8-bit pixels, which throws away the low byte of a 16-bit radiograph. Here the
stored values are kept until the final scaling:

* ``scale="dtype"`` (default): unsigned integers are divided by their largest value (``uint8`` / 255,
  ``uint16`` / 65535), so 16-bit files come back exactly as ``value / 65535``; float files already in ``[0, 1]`` are
  kept; signed-integer files and floats outside ``[0, 1]`` have no natural full scale and use min-max instead;
* ``scale="minmax"``: the image's minimum and maximum map to 0 and 1;
* ``window=(center, width)`` (or a preset name): a linear window on the stored values, see
  :mod:`cvft.data.medical.windowing`.

Decoders: TIFF with ``tifffile`` when installed (first page of multi-page files), PNG with OpenCV (which keeps 16-bit
colour PNGs at 16 bits), Pillow otherwise. Grayscale gives 1 channel and colour 3 (RGB order); an alpha channel is
composited on black (``value * alpha / alpha_max``) as :func:`~cvft.data.io.load_image` does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cvft.data.medical._deps import optional
from cvft.data.medical.windowing import Window, apply_window, resolve_window, scale_min_max
from cvft.errors import ImageLoadError

__all__ = ["RASTER_SUFFIXES", "read_raster", "read_raster_values"]

RASTER_SUFFIXES: frozenset[str] = frozenset({".png", ".tif", ".tiff"})
"""Suffixes read by :func:`read_raster` (other image formats are 8-bit and go through ``load_image``)."""

_FIX = "Re-export it, or remove it"


def read_raster(path: str | Path, window: Window = None, scale: str = "dtype") -> np.ndarray:
    """Read a PNG or TIFF as ``float32`` ``H x W x C`` in ``[0, 1]`` (C = 1 or 3) keeping 16-bit precision.

    Args:
        path: Image file (PNG, TIFF, or anything Pillow reads).
        window: Preset name or ``(center, width)`` applied to the stored values; overrides ``scale``.
        scale: ``"dtype"`` (divide by the type's full scale, e.g. 65535) or ``"minmax"`` (see the module docstring).

    Returns:
        ``float32`` array ``H x W x 1`` (grayscale) or ``H x W x 3`` (RGB).

    Raises:
        ImageLoadError: Missing, corrupt or unsupported file.
        ValueError: Unknown ``scale`` or bad ``window``.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "xray16.png"
        >>> Image.fromarray(np.array([[0, 257, 65535]], dtype=np.uint16)).save(path)
        >>> read_raster(path)[..., 0].tolist() == [[0.0, np.float32(257 / 65535), 1.0]]
        True
    """
    if scale not in ("dtype", "minmax"):
        raise ValueError(f"scale must be 'dtype' or 'minmax', got {scale!r}.")
    values = read_raster_values(path)
    resolved = resolve_window(window)
    if resolved is not None:
        return np.ascontiguousarray(apply_window(values, *resolved))
    if scale == "dtype":
        if np.issubdtype(values.dtype, np.unsignedinteger):
            return (values.astype(np.float64) / float(np.iinfo(values.dtype).max)).astype(np.float32)
        if values.dtype == np.bool_:
            return values.astype(np.float32)
        floating = np.issubdtype(values.dtype, np.floating) and values.size
        if floating and 0.0 <= np.nanmin(values) <= np.nanmax(values) <= 1.0:
            return np.nan_to_num(values.astype(np.float32), nan=0.0)
    return scale_min_max(values)


def read_raster_values(path: str | Path) -> np.ndarray:
    """Decode a PNG / TIFF / other image into its stored values, ``H x W x C`` (C = 1 or 3), dtype as stored.

    Args:
        path: Image file.

    Returns:
        The raw values (``uint8``, ``uint16``, ``int32``, ``float32`` ...); alpha is composited on black.

    Raises:
        ImageLoadError: Missing, corrupt or unsupported file.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "rgb.png"
        >>> Image.new("RGB", (3, 2), (1, 2, 3)).save(path)
        >>> values = read_raster_values(path)
        >>> values.shape, values.dtype, values[0, 0].tolist()
        ((2, 3, 3), dtype('uint8'), [1, 2, 3])
    """
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"Image file {path} does not exist. Check the path, or remove the entry that names it.")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff") and optional("tifffile") is not None:
            values = _tifffile(path)
        elif suffix == ".png" and optional("cv2") is not None:
            values = _opencv(path)
        else:
            values = _pillow(path)
    except ImageLoadError:
        raise
    except Exception as error:  # decoders raise many types for broken files
        raise ImageLoadError(f"Cannot decode image {path} ({type(error).__name__}: {error}). {_FIX}.") from error
    return _to_channels(values, path)


def _tifffile(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages[0]
        values = page.asarray()
        separate = int(page.planarconfig) == 2 and int(page.samplesperpixel) > 1
    if separate and values.ndim == 3:
        values = np.moveaxis(values, 0, -1)  # planar (separate) configuration: samples first
    return values


def _opencv(path: Path) -> np.ndarray:
    import cv2

    values = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if values is None:
        raise ImageLoadError(f"{path} is not an image OpenCV can decode (corrupt or truncated?). {_FIX}.")
    if values.ndim == 3 and values.shape[2] == 3:
        values = values[:, :, ::-1]  # BGR -> RGB
    elif values.ndim == 3 and values.shape[2] == 4:
        values = values[:, :, [2, 1, 0, 3]]  # BGRA -> RGBA
    return values


def _pillow(path: Path) -> np.ndarray:
    try:  # no warning filters here: they are process-wide, and this runs in threads and DataLoader workers
        with Image.open(path) as image:
            image.load()
            if image.mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            elif image.mode == "1":
                image = image.convert("L")
            elif image.mode not in ("L", "LA", "RGB", "RGBA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                image = image.convert("RGB")
            return np.array(image)
    except Image.UnidentifiedImageError as error:
        raise ImageLoadError(f"{path} is not an image Pillow can read. {_FIX}.") from error


def _to_channels(values: np.ndarray, path: Path) -> np.ndarray:
    if values.ndim == 2:
        values = values[:, :, None]
    if values.ndim != 3 or values.shape[2] not in (1, 2, 3, 4):
        raise ImageLoadError(
            f"{path} decodes to an array of shape {values.shape}; cvft reads 2-D images with 1-4 channels. {_FIX}."
        )
    if values.shape[2] in (2, 4):  # alpha: composite on black
        colour, alpha = values[:, :, :-1].astype(np.float64), values[:, :, -1:].astype(np.float64)
        peak = float(np.iinfo(values.dtype).max) if np.issubdtype(values.dtype, np.integer) else 1.0
        composited = colour * alpha / peak
        values = np.rint(composited).astype(values.dtype) if np.issubdtype(values.dtype, np.integer) else composited
    return np.ascontiguousarray(values)
