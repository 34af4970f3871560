"""Property: a damaged image file either loads or raises cvft's ImageLoadError naming it; nothing else, no hang.

Valid PNG / JPEG / TIFF / 16-bit / DICOM / NIfTI files are truncated, bit-flipped and renamed to the wrong suffix,
then read with the readers training uses: ``load_image`` (8-bit images) and ``read_medical_image`` (all formats).
"""

from __future__ import annotations

import faulthandler
import gzip
import io
import itertools
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cvft.data.io import load_image
from cvft.errors import ImageLoadError

pydicom = pytest.importorskip("pydicom")
nibabel = pytest.importorskip("nibabel")

from cvft.data.medical import read_medical_image  # noqa: E402  (needs the medical extras)

_HANG_LIMIT_S = 120  # the whole property, not one case: a hung decoder dumps every thread's stack and exits


def _pil_bytes(fmt: str, mode: str = "RGB") -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if mode == "I;16":
        image = Image.fromarray(pixels[:, :, 0].astype(np.uint16) * 257)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _dicom_bytes() -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = CTImageStorage, "1.2.3.4"
    dataset.Modality, dataset.PhotometricInterpretation = "CT", "MONOCHROME2"
    dataset.Rows, dataset.Columns, dataset.SamplesPerPixel = 8, 6, 1
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 12, 11, 0
    dataset.RescaleSlope, dataset.RescaleIntercept = 1, -1024
    dataset.WindowCenter, dataset.WindowWidth = 40, 400
    dataset.PixelData = np.arange(48, dtype=np.uint16).reshape(8, 6).tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _nifti_bytes(compressed: bool) -> bytes:
    volume = np.random.default_rng(1).normal(size=(6, 5, 4)).astype(np.float32)
    image = nibabel.Nifti1Image(volume, np.eye(4))
    buffer = io.BytesIO()
    holder = nibabel.FileHolder(fileobj=buffer)
    image.to_file_map({"image": holder, "header": holder})
    return gzip.compress(buffer.getvalue()) if compressed else buffer.getvalue()


# name -> (valid bytes, its suffix, whether load_image reads it too)
SOURCES: dict[str, tuple[bytes, str, bool]] = {
    "png": (_pil_bytes("PNG"), ".png", True),
    "jpeg": (_pil_bytes("JPEG"), ".jpg", True),
    "tiff": (_pil_bytes("TIFF"), ".tif", True),
    "png16": (_pil_bytes("PNG", "I;16"), ".png", True),
    "tiff16": (_pil_bytes("TIFF", "I;16"), ".tif", True),
    "dicom": (_dicom_bytes(), ".dcm", False),
    "nifti": (_nifti_bytes(False), ".nii", False),
    "nifti_gz": (_nifti_bytes(True), ".nii.gz", False),
}
WRONG_SUFFIXES = (".png", ".jpg", ".tif", ".bmp", ".dcm", ".nii", ".nii.gz", "")


@st.composite
def damaged_files(draw: Callable) -> tuple[str, bytes, str, str]:
    """(source name, damaged bytes, suffix, how it was damaged)."""
    name = draw(st.sampled_from(sorted(SOURCES)))
    data, suffix, _ = SOURCES[name]
    damage = draw(st.sampled_from(["truncate", "flip", "suffix", "truncate+suffix", "flip+suffix"]))
    content = bytearray(data)
    if "truncate" in damage:
        content = content[: draw(st.integers(0, len(data) - 1))]
    if "flip" in damage:
        for position, bit in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 7)), max_size=8)):
            content[position] ^= 1 << bit
    if "suffix" in damage:
        suffix = draw(st.sampled_from([s for s in WRONG_SUFFIXES if s != suffix]))
    return name, bytes(content), suffix, damage


@pytest.fixture(scope="module")
def case_folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


@pytest.fixture(scope="module", autouse=True)
def _hang_guard() -> Iterator[None]:
    faulthandler.dump_traceback_later(_HANG_LIMIT_S, exit=True, file=sys.stderr)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(autouse=True)
def _small_images_only(monkeypatch) -> None:
    """A flipped size field may claim 80 million pixels: refuse such sizes early, as on a real bomb."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2**18)  # 512 x 512


_counter = itertools.count()


def _assert_loads_or_names_the_file(read: Callable[[Path], np.ndarray], path: Path, how: str) -> None:
    try:
        array = read(path)
    except ImageLoadError as error:
        assert path.name in str(error), f"{how}: the error does not name the file: {error}"
    except Exception as error:  # the property: nothing but ImageLoadError escapes a reader
        pytest.fail(f"{how}: {type(error).__name__} escaped instead of ImageLoadError: {error}")
    else:
        assert isinstance(array, np.ndarray) and array.ndim == 3, how


@pytest.mark.filterwarnings("ignore")  # decoders warn about the damage they tolerate; that is not under test
@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,  # no .hypothesis folder in the checkout: the examples are the same on every run
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=damaged_files())
def test_damaged_files_load_or_raise_image_load_error(case, case_folder):
    name, content, suffix, damage = case
    path = case_folder / f"case{next(_counter)}{suffix}"
    path.write_bytes(content)
    how = f"{name} {damage} -> {path.name} ({len(content)} bytes)"
    _assert_loads_or_names_the_file(read_medical_image, path, f"read_medical_image: {how}")
    if SOURCES[name][2] and suffix in (".png", ".jpg", ".tif", ".bmp"):
        _assert_loads_or_names_the_file(load_image, path, f"load_image: {how}")


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_undamaged_sources_load(name, case_folder):
    data, suffix, by_load_image = SOURCES[name]
    path = case_folder / f"valid_{name}{suffix}"
    path.write_bytes(data)
    assert read_medical_image(path).ndim == 3
    if by_load_image:
        assert load_image(path).dtype == np.uint8
