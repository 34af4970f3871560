"""8/16-bit PNG and TIFF at full precision; MedMNIST .npz layout, paths and tasks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cvft.data.medical import (
    load_medmnist_npz,
    medmnist_path,
    medmnist_task,
    raster,
    read_medical_image,
    read_raster,
    read_raster_values,
)
from cvft.errors import DatasetError, ImageLoadError

GRAY16 = np.array([[0, 1, 257, 1000], [12345, 32768, 65534, 65535]], dtype=np.uint16)
RGB16 = np.stack([GRAY16, GRAY16[::-1], GRAY16 // 3], axis=-1).astype(np.uint16)
GRAY8 = np.array([[0, 1, 128], [200, 254, 255]], dtype=np.uint8)


def exact(values: np.ndarray, peak: float) -> np.ndarray:
    return (values.astype(np.float64) / peak).astype(np.float32)


@pytest.fixture(params=["default", "pillow"])
def decoders(request, monkeypatch):
    """Run with the preferred decoders (tifffile, OpenCV) and with Pillow alone."""
    if request.param == "pillow":
        monkeypatch.setattr(raster, "optional", lambda name: None)
    return request.param


def test_16_bit_grayscale_png_and_tiff_come_back_exactly(tmp_path, decoders):
    png, tif = tmp_path / "x.png", tmp_path / "x.tif"
    Image.fromarray(GRAY16).save(png)
    Image.fromarray(GRAY16).save(tif)
    for path in (png, tif):
        image = read_raster(path)
        assert image.shape == (2, 4, 1) and image.dtype == np.float32
        assert np.array_equal(image[..., 0], exact(GRAY16, 65535))
        assert np.array_equal(read_raster_values(path)[..., 0], GRAY16)


def test_8_bit_grayscale_and_rgb_are_divided_by_255(tmp_path, decoders):
    rgb = np.stack([GRAY8, GRAY8[::-1], 255 - GRAY8], axis=-1)
    for name, pixels in (("g.png", GRAY8), ("c.png", rgb), ("g.tif", GRAY8), ("c.tif", rgb)):
        Image.fromarray(pixels).save(tmp_path / name)
        image = read_raster(tmp_path / name)
        expected = exact(pixels, 255)
        assert np.array_equal(image, expected if expected.ndim == 3 else expected[..., None]), name


def test_16_bit_rgb_tiff_and_png_keep_16_bits(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    cv2 = pytest.importorskip("cv2")
    tifffile.imwrite(tmp_path / "rgb.tif", RGB16)
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(RGB16, -1, 0), photometric="rgb", planarconfig="separate")
    cv2.imwrite(str(tmp_path / "rgb.png"), RGB16[:, :, ::-1])  # OpenCV writes BGR
    for name in ("rgb.tif", "planar.tif", "rgb.png"):
        image = read_raster(tmp_path / name)
        assert image.shape == (2, 4, 3), name
        assert np.array_equal(image, exact(RGB16, 65535)), name


def test_windows_and_min_max_apply_to_the_stored_values(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(GRAY16).save(path)
    windowed = read_raster(path, window=(1000, 2000))[..., 0]  # 0 -> 0, 2000 -> 1
    assert windowed == pytest.approx(np.clip(GRAY16 / 2000.0, 0, 1), abs=1e-6)
    assert read_raster(path, scale="minmax")[..., 0] == pytest.approx(GRAY16 / 65535.0, abs=1e-6)
    Image.fromarray((GRAY16 // 2 + 100).astype(np.uint16)).save(path)
    stored = GRAY16 // 2 + 100
    assert read_raster(path, scale="minmax")[..., 0] == pytest.approx(
        (stored - stored.min()) / (stored.max() - stored.min()), abs=1e-6
    )
    with pytest.raises(ValueError, match="scale"):
        read_raster(path, scale="percentile")


def test_read_medical_image_dispatches_rasters_and_8_bit_images(tmp_path):
    Image.fromarray(GRAY16).save(tmp_path / "x.png")
    assert np.array_equal(read_medical_image(tmp_path / "x.png")[..., 0], exact(GRAY16, 65535))
    Image.fromarray(np.repeat(GRAY8[..., None], 3, axis=2)).save(tmp_path / "gray.bmp")
    image = read_medical_image(tmp_path / "gray.bmp")
    assert image.shape == (2, 3, 1) and np.array_equal(image[..., 0], exact(GRAY8, 255))
    with pytest.raises(ValueError, match="do not apply to raster"):
        read_medical_image(tmp_path / "x.png", frame=0)
    with pytest.raises(ImageLoadError, match="Cannot tell the format"):
        read_medical_image(tmp_path / "notes.txt")


def test_corrupt_rasters_raise_image_load_error_naming_them(tmp_path, decoders):
    Image.fromarray(GRAY16).save(tmp_path / "good.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "good.png").read_bytes()[:40])
    (tmp_path / "text.tif").write_text("not an image")
    for name in ("cut.png", "text.tif"):
        with pytest.raises(ImageLoadError, match=name):
            read_raster(tmp_path / name)


def write_npz(path, **overrides):
    rng = np.random.default_rng(0)
    sizes = {"train": 6, "val": 2, "test": 3}
    arrays = {}
    for split, n in sizes.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1), dtype=np.uint8)
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return arrays


def test_a_tiny_npz_in_the_published_layout_loads(tmp_path):
    path = tmp_path / "pneumoniamnist.npz"
    arrays = write_npz(path, val_labels=np.array([1, 0], dtype=np.uint8))  # (N,) labels, as some copies store
    images, labels = load_medmnist_npz(path, "train")
    assert images.dtype == np.uint8 and images.shape == (6, 28, 28)
    assert np.array_equal(images, arrays["train_images"]) and np.array_equal(labels, arrays["train_labels"])
    assert load_medmnist_npz(path, "val")[1].tolist() == [[1], [0]]
    colour = tmp_path / "bloodmnist.npz"
    write_npz(colour, test_images=np.zeros((3, 28, 28, 3), np.uint8))
    assert load_medmnist_npz(colour, "test")[0].shape == (3, 28, 28, 3)


def test_a_wrong_layout_lists_the_keys_found(tmp_path):
    path = tmp_path / "wrong.npz"
    np.savez(path, x_train=np.zeros((2, 28, 28), np.uint8), y_train=np.zeros(2, np.uint8))
    with pytest.raises(DatasetError, match=r"train_images.*\['x_train', 'y_train'\]"):
        load_medmnist_npz(path, "train")
    bad = tmp_path / "bad.npz"
    write_npz(bad, train_labels=np.zeros((5, 1), np.uint8))
    with pytest.raises(DatasetError, match="6 images"):
        load_medmnist_npz(bad, "train")
    with pytest.raises(ValueError, match="split"):
        load_medmnist_npz(bad, "validation")


def test_medmnist_path_looks_in_root_then_the_environment(tmp_path, monkeypatch):
    write_npz(tmp_path / "breastmnist.npz")
    monkeypatch.delenv("CVFT_MEDMNIST_DIR", raising=False)
    assert medmnist_path("breastmnist", root=tmp_path) == tmp_path / "breastmnist.npz"
    assert medmnist_path(str(tmp_path / "breastmnist.npz")) == tmp_path / "breastmnist.npz"
    monkeypatch.setenv("CVFT_MEDMNIST_DIR", str(tmp_path))
    assert medmnist_path("breastmnist") == tmp_path / "breastmnist.npz"
    with pytest.raises(DatasetError, match=r"dermamnist_64\.npz not found.*CVFT_MEDMNIST_DIR"):
        medmnist_path("dermamnist", size=64)


def test_download_without_the_medmnist_package_names_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "medmnist", None)
    with pytest.raises(DatasetError, match=r"pip install medmnist.*\.npz"):
        medmnist_path("pathmnist", root=tmp_path, download=True)


def test_tasks_from_official_names_and_from_labels():
    assert medmnist_task("chestmnist").multi_label and medmnist_task("chestmnist").num_classes == 14
    assert medmnist_task("pneumoniamnist_64").task == "binary"
    assert medmnist_task("dermamnist").num_classes == 7
    assert medmnist_task("mine", labels=np.array([[0, 1, 1], [1, 0, 0]])).task == "multi-label"
    assert medmnist_task(labels=np.array([0, 1, 1])).task == "binary"
    assert medmnist_task(labels=np.array([[3], [0]])).num_classes == 4
    with pytest.raises(ValueError, match="labels"):
        medmnist_task("mine")


@pytest.mark.assets
def test_real_pneumoniamnist_has_the_official_split_sizes(shared_assets):
    path = medmnist_path("pneumoniamnist", root=shared_assets / "medmnist_28")
    sizes = {}
    for split in ("train", "val", "test"):
        images, labels = load_medmnist_npz(path, split)
        assert images.shape[1:] == (28, 28) and labels.shape == (len(images), 1)
        assert set(np.unique(labels).tolist()) == {0, 1}
        sizes[split] = len(images)
    assert sizes == {"train": 4708, "val": 524, "test": 624}
    assert medmnist_task("pneumoniamnist", labels).task == "binary"
