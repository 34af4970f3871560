"""Reading image files into ``uint8`` arrays, whatever their Pillow mode.

Every file goes through :func:`load_image`, so training, validation and prediction see the same pixels:

* ``L``, ``RGB``: used as stored. ``1`` (bilevel) becomes 0 / 255.
* ``LA``, ``RGBA``, ``PA`` and palette images with a transparent colour: **alpha-composited on black**
  (``pixel * alpha / 255``), so fully transparent pixels are black whatever colour they hide.
* ``P`` (palette): expanded to the palette's colours.
* ``I;16``, ``I;16B``, ``I;16L``, ``I``: 16-bit range scaled to 8 bits by ``round(v / 257)`` (65535 -> 255,
  25700 -> 100); ``I`` values outside 0..65535 are clipped first.
* ``F`` (float): values within 0..1 are scaled by 255, anything else is clipped to 0..255 (NaN -> 0).
* ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` and other colour modes: converted to RGB by Pillow.
* EXIF orientation (photos from phones) is applied, multi-frame files (GIF, TIFF) use their first frame.

Unreadable files (missing, corrupt, truncated, not an image) raise :class:`~cvft.errors.ImageLoadError` naming the
file and saying how to fix it. Truncated files raise even when a library set Pillow's process-wide
``ImageFile.LOAD_TRUNCATED_IMAGES``: reading never changes that flag, nor the process's warning filters, so it is
safe from threads and DataLoader workers alike.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from cvft.errors import ImageLoadError

__all__ = ["IMAGE_SUFFIXES", "is_image_file", "load_image", "check_image"]

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
"""File suffixes (lower case) treated as images when scanning folders."""

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_ALPHA_MODES = frozenset({"LA", "La", "RGBA", "RGBa", "PA"})
_FIX = "Re-export it as PNG/JPEG or delete it"


def is_image_file(path: str | Path) -> bool:
    """Return whether ``path`` has an image suffix (see :data:`IMAGE_SUFFIXES`, case-insensitive).

    Args:
        path: A file path; the file need not exist.

    Returns:
        ``True`` for ``.jpg``, ``.PNG`` … files.

    Example:
        >>> is_image_file("cat.JPG"), is_image_file("labels.csv")
        (True, False)
    """
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def load_image(path: str | Path, channels: int = 3) -> np.ndarray:
    """Decode an image file into an ``H x W x C`` ``uint8`` array.

    Args:
        path: Image file.
        channels: 3 for RGB (grayscale images are repeated to 3 identical channels) or 1 for grayscale (colour
            images are converted with Pillow's ITU-R 601-2 luma).

    Returns:
        Array of shape ``(H, W, channels)`` and dtype ``uint8``.

    Raises:
        ImageLoadError: The file is missing, not an image, corrupt or truncated.
        ValueError: ``channels`` is not 1 or 3.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> path = Path(tempfile.mkdtemp()) / "gray.png"
        >>> Image.new("L", (4, 2), 7).save(path)
        >>> load_image(path).shape, load_image(path, channels=1).shape
        ((2, 4, 3), (2, 4, 1))
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}.")
    path = Path(path)
    image = _decode(path)
    try:
        array = _to_uint8(image)
    except Exception as error:  # any conversion failure means an unusable file
        raise ImageLoadError(f"Cannot convert image {path} (mode {image.mode}): {error}. {_FIX}.") from error
    if channels == 3 and array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    if channels == 1 and array.shape[2] == 3:
        return np.array(Image.fromarray(array, "RGB").convert("L"))[:, :, None]
    return array


def check_image(path: str | Path, full: bool = False) -> None:
    """Validate an image file without returning its pixels.

    Args:
        path: Image file.
        full: Decode every pixel and convert it as :func:`load_image` does (catches truncated files). JPEG files are
            decoded at 1/8 scale (Pillow's ``draft`` mode), which still reads all of the file but skips most of the
            work. ``False`` only parses the header and runs Pillow's ``verify()``, which is cheap but misses
            truncated JPEGs.

    Raises:
        ImageLoadError: The file is missing, not an image, corrupt (or, with ``full=True``, truncated).

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "notes.jpg"
        >>> _ = path.write_text("not an image")
        >>> try:
        ...     check_image(path)
        ... except ImageLoadError as error:
        ...     print("delete it" in str(error))
        True
    """
    path = Path(path)
    if full:
        image = _decode(path, reduced=True)
        try:
            _to_uint8(image)
        except Exception as error:  # any conversion failure means an unusable file
            raise ImageLoadError(f"Cannot convert image {path} (mode {image.mode}): {error}. {_FIX}.") from error
        return
    _check_exists(path)
    try:
        with Image.open(path) as image:
            image.verify()
    except Image.UnidentifiedImageError as error:
        raise ImageLoadError(f"{path} is not an image Pillow can read. {_FIX}.") from error
    except Exception as error:  # Pillow raises many types for broken files
        raise ImageLoadError(f"{path} is corrupt ({type(error).__name__}: {error}). {_FIX}.") from error


class _EndWatchingReader(io.BufferedReader):
    """A buffered file that records whether a read came back empty, i.e. something wanted bytes past the end.

    Pillow stops silently at the end of a truncated file when ``ImageFile.LOAD_TRUNCATED_IMAGES`` is set; that flag
    is process-wide, so instead of switching it off (which races with other threads) the decode watches for reads
    past the end. Complete files of every format Pillow decodes through ``read`` never make one while loading.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self.hit_end = False

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if not data and size != 0:
            self.hit_end = True
        return data


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise ImageLoadError(f"Image file {path} does not exist. Check the path, or remove the entry that names it.")
    if not path.is_file():
        raise ImageLoadError(f"Image path {path} is not a file. Point to an image file instead.")
    if not os.access(path, os.R_OK):
        raise ImageLoadError(f"Image file {path} is not readable. Fix its permissions or delete it.")


def _decode(path: Path, reduced: bool = False) -> Image.Image:
    _check_exists(path)
    try:
        with _EndWatchingReader(path) as file, Image.open(file) as image:
            if reduced and image.format == "JPEG":
                image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
            file.hit_end = False  # identifying the format may probe past the end of a tiny file
            image.load()
            if file.hit_end and ImageFile.LOAD_TRUNCATED_IMAGES:  # otherwise Pillow has raised already
                raise OSError("image file is truncated")
            return _apply_exif_orientation(image)
    except Image.UnidentifiedImageError as error:
        raise ImageLoadError(f"{path} is not an image Pillow can read. {_FIX}.") from error
    except Image.DecompressionBombError as error:
        raise ImageLoadError(
            f"{path} is too large to decode safely ({error}). Downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS."
        ) from error
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError …
        raise ImageLoadError(f"{path} is corrupt or truncated ({type(error).__name__}: {error}). {_FIX}.") from error


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        rotated = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not make readable pixels unusable
        return image.copy()
    return rotated if rotated is not None else image.copy()


def _to_uint8(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("L", "RGB"):
        array = np.array(image, dtype=np.uint8)  # a writable copy
    elif mode == "1":
        array = np.asarray(image.convert("L"), dtype=np.uint8)
    elif mode in _SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image).astype(np.float64), 0, 65535)
        array = np.rint(values / 257.0).astype(np.uint8)
    elif mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
        array = np.rint(np.clip(values, 0, 255)).astype(np.uint8)
    elif mode in _ALPHA_MODES:
        array = _composite_on_black(image)
    else:  # CMYK, YCbCr, LAB, HSV, I;16 variants Pillow may add …
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    array = np.ascontiguousarray(array)
    return array if array.flags.writeable else array.copy()


def _composite_on_black(image: Image.Image) -> np.ndarray:
    target = "LA" if image.mode in ("LA", "La") else "RGBA"
    rgba = np.asarray(image.convert(target), dtype=np.uint16)
    colour, alpha = rgba[:, :, :-1], rgba[:, :, -1:]
    return ((colour * alpha + 127) // 255).astype(np.uint8)
