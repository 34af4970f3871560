"""DICOM reading: rescale to Hounsfield units, windows, MONOCHROME1, frames, colour and broken files."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from cvft.data.medical import (
    WINDOW_PRESETS,
    apply_window,
    dicom_frame_count,
    is_dicom_file,
    read_dicom,
    read_medical_image,
    resolve_window,
)
from cvft.errors import DatasetError, ImageLoadError

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

CT = get_testdata_file("CT_small.dcm")
PIXELS = [(0, 0), (40, 70), (64, 64), (100, 20), (127, 127)]


def linear_window(hu: float, center: float, width: float) -> float:
    """The documented formula, written out independently of cvft."""
    return min(1.0, max(0.0, (hu - (center - width / 2)) / width))


def test_window_presets_are_the_standard_ct_values():
    assert WINDOW_PRESETS == {
        "lung": (-600, 1500), "mediastinum": (50, 350), "bone": (400, 1800), "brain": (40, 80),
        "soft_tissue": (50, 400),
    }  # fmt: skip
    assert resolve_window("Soft-Tissue") == (50, 400)
    # brain window: 0 HU -> 0, 80 HU -> 1
    assert apply_window(np.array([-10.0, 0.0, 20.0, 40.0, 79.9, 200.0]), 40, 80).tolist() == pytest.approx(
        [0.0, 0.0, 0.25, 0.5, 0.99875, 1.0], abs=1e-6
    )


@pytest.mark.parametrize("window", ["lungs", (40, 0), (40,), "dicom"])
def test_bad_windows_are_refused_with_the_presets_listed(window):
    with pytest.raises(ValueError, match="lung|width > 0|pair"):
        resolve_window(window)


def test_ct_hounsfield_units_come_from_rescale_slope_and_intercept():
    dataset = pydicom.dcmread(CT)
    raw = dataset.pixel_array.astype(np.float64)
    slope, intercept = float(dataset.RescaleSlope), float(dataset.RescaleIntercept)
    assert (slope, intercept) == (1.0, -1024.0)
    # a window spanning exactly [min HU, max HU] recovers the HU values linearly
    hu = raw * slope + intercept
    low, high = hu.min(), hu.max()
    image = read_dicom(CT, window=((low + high) / 2, high - low))
    assert image.shape == (128, 128, 1) and image.dtype == np.float32
    for row, col in PIXELS:
        expected_hu = raw[row, col] * 1.0 - 1024.0
        assert low + image[row, col, 0] * (high - low) == pytest.approx(expected_hu, abs=0.05)
    # window=None is min-max of the image
    assert read_dicom(CT)[..., 0] == pytest.approx((hu - low) / (high - low), abs=1e-6)


@pytest.mark.parametrize("name", ["lung", "bone", "mediastinum"])
def test_ct_windows_match_the_formula_by_hand(name):
    raw = pydicom.dcmread(CT).pixel_array
    center, width = WINDOW_PRESETS[name]
    image = read_dicom(CT, window=name)
    for row, col in PIXELS:
        hu = int(raw[row, col]) - 1024
        assert image[row, col, 0] == pytest.approx(linear_window(hu, center, width), abs=1e-6)
    assert read_medical_image(CT, window=(center, width)) == pytest.approx(image)


def test_the_files_own_window_is_used_with_window_dicom():
    path = get_testdata_file("MR_small.dcm")
    dataset = pydicom.dcmread(path)
    assert (float(dataset.WindowCenter), float(dataset.WindowWidth)) == (600.0, 1600.0)
    assert "RescaleSlope" not in dataset
    image = read_dicom(path, window="dicom")
    raw = dataset.pixel_array
    for row, col in [(0, 0), (32, 32), (10, 50)]:
        assert image[row, col, 0] == pytest.approx(linear_window(int(raw[row, col]), 600, 1600), abs=1e-6)
    with pytest.raises(DatasetError, match="WindowCenter"):
        read_dicom(CT, window="dicom")  # CT_small stores no window


def test_window_dicom_uses_the_first_of_several_stored_windows(tmp_path):
    dataset = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    dataset.WindowCenter, dataset.WindowWidth = [300, 600], [200, 1600]
    path = tmp_path / "two_windows.dcm"
    dataset.save_as(path)
    raw = dataset.pixel_array
    image = read_dicom(path, window="dicom")
    for row, col in [(0, 0), (32, 32), (10, 50)]:
        assert image[row, col, 0] == pytest.approx(linear_window(int(raw[row, col]), 300, 200), abs=1e-6)


def test_monochrome1_is_inverted_after_windowing(tmp_path):
    dataset = pydicom.dcmread(CT)
    dataset.PhotometricInterpretation = "MONOCHROME1"
    inverted = tmp_path / "mono1.dcm"
    dataset.save_as(inverted)
    for window in ("lung", None):
        assert read_dicom(inverted, window=window) == pytest.approx(1.0 - read_dicom(CT, window=window), abs=1e-6)
    raw = pydicom.dcmread(CT).pixel_array
    assert read_dicom(inverted, window="bone")[64, 64, 0] == pytest.approx(
        1.0 - linear_window(int(raw[64, 64]) - 1024, 400, 1800), abs=1e-6
    )


def test_multi_frame_files_need_a_frame():
    path = get_testdata_file("rtdose.dcm")
    raw = pydicom.dcmread(path).pixel_array.astype(np.float64)  # 15 x 10 x 10
    assert dicom_frame_count(path) == 15
    with pytest.raises(ValueError, match=r"15 frames.*frame=.*frame='all'"):
        read_dicom(path)
    frame = raw[7]
    expected = (frame - frame.min()) / (frame.max() - frame.min())
    assert read_dicom(path, frame=7)[..., 0] == pytest.approx(expected, abs=1e-6)
    stack = read_dicom(path, frame="all")
    assert stack.shape == (10, 10, 15)
    assert stack == pytest.approx(np.moveaxis((raw - raw.min()) / (raw.max() - raw.min()), 0, -1), abs=1e-6)
    with pytest.raises(ValueError, match=r"0\.\.14"):
        read_dicom(path, frame=15)


def test_colour_dicoms_are_rgb_in_unit_range():
    path = get_testdata_file("SC_rgb_rle_2frame.dcm")
    raw = pydicom.dcmread(path).pixel_array  # 2 x 100 x 100 x 3, uint8 RGB
    image = read_dicom(path, frame=1)
    assert image.shape == (100, 100, 3)
    assert image == pytest.approx(raw[1] / 255.0, abs=1e-6)
    with pytest.raises(ValueError, match="grayscale"):
        read_dicom(path, frame=0, window="lung")


def test_broken_and_non_dicom_files_raise_image_load_error_naming_them(tmp_path):
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(Path(CT).read_bytes()[:2000])
    with pytest.raises(ImageLoadError, match="truncated.dcm"):
        read_dicom(truncated)
    text = tmp_path / "notes.dcm"
    text.write_text("not a DICOM file")
    with pytest.raises(ImageLoadError, match=r"notes\.dcm is not a DICOM file"):
        read_dicom(text)
    with pytest.raises(ImageLoadError, match="MR_truncated.dcm.*truncated"):
        read_dicom(get_testdata_file("MR_truncated.dcm"))
    with pytest.raises(ImageLoadError, match="does not exist"):
        read_dicom(tmp_path / "missing.dcm")


def test_a_missing_decoder_plugin_is_named():
    path = get_testdata_file("JPEGLSNearLossless_08.dcm")
    try:
        _ = pydicom.dcmread(path).pixel_array
        pytest.skip("a JPEG-LS decoder is installed here")
    except RuntimeError:
        pass
    with pytest.raises(ImageLoadError, match=r"JPEG-LS.*pylibjpeg.*python-gdcm"):
        read_dicom(path)


def test_missing_pydicom_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ImportError, match=r'pip install "cvft\[medical\]"'):
        read_dicom(CT)


def test_dicom_without_suffix_is_found_by_its_preamble(tmp_path):
    plain = tmp_path / "IM000001"
    shutil.copy(CT, plain)
    assert is_dicom_file(plain) and not is_dicom_file(tmp_path / "other")
    assert np.array_equal(read_medical_image(plain, window="lung"), read_dicom(CT, window="lung"))
    with pytest.raises(ValueError, match=r"\['context', 'slice_index'\] do not apply to dicom"):
        read_medical_image(plain, slice_index=3, context=1)
