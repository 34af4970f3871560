"""NIfTI slices: canonical orientation, every axis, 2.5D stacks clamped at the edges, intensity scaling."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from cvft.data.medical import nifti_slices, read_medical_image, read_nifti_slice, read_nifti_volume
from cvft.errors import ImageLoadError

nib = pytest.importorskip("nibabel")
from nibabel.testing import data_path  # noqa: E402

ANATOMICAL = os.path.join(data_path, "anatomical.nii")  # 33 x 41 x 25, stored LAS
EXAMPLE_4D = os.path.join(data_path, "example4d.nii.gz")  # 128 x 96 x 24 x 2, stored LAS
SHAPE = (5, 4, 3)
TOP = 100 * 4 + 10 * 3 + 2  # largest value of the gradient volume


def gradient_volume(tmp_path, affine=None, name="gradient.nii.gz"):
    """value(x, y, z) = 100 x + 10 y + z, RAS+ by default."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    path = tmp_path / name
    nib.save(nib.Nifti1Image((100 * x + 10 * y + z).astype(np.int16), np.eye(4) if affine is None else affine), path)
    return path


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slices_along_each_axis_are_numpy_indexing_of_the_volume(tmp_path, axis):
    path = gradient_volume(tmp_path)
    for k in range(SHAPE[axis]):
        image = read_nifti_slice(path, slice_index=k, axis=axis, scale="minmax")
        index = [slice(None)] * 3
        index[axis] = k
        x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
        expected = (100 * x + 10 * y + z)[tuple(index)] / TOP
        assert image.shape == expected.shape + (1,) and image.dtype == np.float32
        assert image[..., 0] == pytest.approx(expected, abs=1e-6)
    assert nifti_slices(path, axis) == SHAPE[axis]


def test_stored_orientation_is_made_canonical(tmp_path):
    flipped = gradient_volume(tmp_path, affine=np.diag([-1.0, 1.0, 1.0, 1.0]))  # LAS: x runs right-to-left
    image = read_nifti_slice(flipped, slice_index=0, axis=0, scale="minmax")
    # canonical slice 0 along x is the stored slice x = 4: values 400 + 10 y + z
    y, z = np.meshgrid(np.arange(4), np.arange(3), indexing="ij")
    assert image[..., 0] == pytest.approx((400 + 10 * y + z) / TOP, abs=1e-6)
    swapped = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)  # voxel i -> y
    path = gradient_volume(tmp_path, affine=swapped, name="swapped.nii")
    assert [nifti_slices(path, axis) for axis in range(3)] == [4, 5, 3]
    assert read_nifti_slice(path, slice_index=1, axis=0).shape == (5, 3, 1)


def test_a_real_las_volume_matches_nibabels_canonical_data():
    image = nib.load(ANATOMICAL)
    assert nib.aff2axcodes(image.affine) == ("L", "A", "S")
    canonical = np.asarray(image.dataobj, dtype=np.float64)[::-1]  # LAS -> RAS flips axis 0
    assert np.array_equal(canonical, np.asarray(nib.as_closest_canonical(image).dataobj))
    low, high = canonical.min(), canonical.max()
    assert read_nifti_slice(ANATOMICAL, slice_index=7, axis=1, scale="minmax")[..., 0] == pytest.approx(
        (canonical[:, 7, :] - low) / (high - low), abs=1e-6
    )
    middle = read_nifti_slice(ANATOMICAL, scale="minmax")  # slice_index=None: 25 // 2
    assert middle[..., 0] == pytest.approx((canonical[:, :, 12] - low) / (high - low), abs=1e-6)
    assert [nifti_slices(ANATOMICAL, axis) for axis in range(3)] == [33, 41, 25]


def test_context_stacks_neighbours_and_repeats_the_edge_slices(tmp_path):
    path = gradient_volume(tmp_path)
    volume = read_nifti_volume(path) / TOP
    first = read_nifti_slice(path, slice_index=0, axis=2, context=1, scale="minmax")
    assert first.shape == (5, 4, 3)
    for channel, z in enumerate([0, 0, 1]):
        assert first[..., channel] == pytest.approx(volume[:, :, z], abs=1e-6)
    last = read_nifti_slice(path, slice_index=2, axis=2, context=2, scale="minmax")
    for channel, z in enumerate([0, 1, 2, 2, 2]):
        assert last[..., channel] == pytest.approx(volume[:, :, z], abs=1e-6)
    along_x = read_medical_image(path, slice_index=4, axis=0, context=1, scale="minmax")
    for channel, x in enumerate([3, 4, 4]):
        assert along_x[..., channel] == pytest.approx(volume[x], abs=1e-6)


def test_percentile_and_window_scaling_by_hand(tmp_path):
    values = np.linspace(-1000.0, 1000.0, 8 * 8 * 5).reshape(8, 8, 5).astype(np.float32)
    values[0, 0, 0] = 30000.0  # a hot voxel the percentile scale ignores
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(values, np.eye(4)), path)
    low, high = np.percentile(values, [0.5, 99.5])
    expected = np.clip((values[:, :, 0] - low) / (high - low), 0, 1)
    assert read_nifti_slice(path, slice_index=0)[..., 0] == pytest.approx(expected, abs=1e-5)
    brain = read_nifti_slice(path, slice_index=3, window="brain")[..., 0]  # (40, 80): 0 HU -> 0, 80 HU -> 1
    assert brain == pytest.approx(np.clip(values[:, :, 3] / 80.0, 0, 1), abs=1e-6)
    with pytest.raises(ValueError, match="scale='window'"):
        read_nifti_slice(path, scale="window")


def test_4d_volumes_pick_volume_index():
    canonical = np.asarray(nib.load(EXAMPLE_4D).dataobj[..., 1], dtype=np.float64)[::-1]
    image = read_nifti_slice(EXAMPLE_4D, slice_index=10, volume_index=1, scale="minmax")
    assert image.shape == (128, 96, 1)
    assert image[..., 0] == pytest.approx(
        (canonical[:, :, 10] - canonical.min()) / (canonical.max() - canonical.min()), abs=1e-6
    )
    with pytest.raises(ValueError, match=r"volume_index=2.*0\.\.1"):
        read_nifti_slice(EXAMPLE_4D, volume_index=2)


def test_bad_arguments_and_files_raise_clear_errors(tmp_path, monkeypatch):
    path = gradient_volume(tmp_path)
    with pytest.raises(ValueError, match=r"out of range.*0\.\.2"):
        read_nifti_slice(path, slice_index=3)
    with pytest.raises(ValueError, match="axis must be"):
        read_nifti_slice(path, axis=3)
    with pytest.raises(ValueError, match="frame"):
        read_medical_image(path, frame=0)
    broken = tmp_path / "broken.nii"
    broken.write_bytes(b"\x00" * 100)
    with pytest.raises(ImageLoadError, match="broken.nii"):
        read_nifti_slice(broken)
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(ImportError, match=r'pip install "cvft\[medical\]"'):
        read_nifti_slice(tmp_path / "other.nii")
