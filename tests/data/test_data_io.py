from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from cvft.data.io import IMAGE_SUFFIXES, check_image, is_image_file, load_image
from cvft.errors import DatasetError, ImageLoadError


def _roundtrip(tmp_path, image: Image.Image, name: str, channels: int = 3) -> np.ndarray:
    path = tmp_path / name
    image.save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == image.mode, "the test must exercise the intended mode"
    array = load_image(path, channels=channels)
    assert array.dtype == np.uint8
    assert array.shape == (image.height, image.width, channels)
    return array


def test_rgb_png_is_exact(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    array = _roundtrip(tmp_path, Image.fromarray(pixels, "RGB"), "rgb.png")
    np.testing.assert_array_equal(array, pixels)
    assert array.flags.writeable


def test_rgb_jpeg_loads(tmp_path):
    array = _roundtrip(tmp_path, Image.new("RGB", (8, 6), (200, 30, 60)), "rgb.jpg")
    assert np.abs(array.astype(int) - [200, 30, 60]).max() <= 3


def test_grayscale_becomes_three_identical_channels(tmp_path):
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    array = _roundtrip(tmp_path, Image.fromarray(pixels, "L"), "gray.png")
    for c in range(3):
        np.testing.assert_array_equal(array[:, :, c], pixels)
    np.testing.assert_array_equal(load_image(tmp_path / "gray.png", channels=1)[:, :, 0], pixels)


def test_rgb_to_one_channel_uses_luma(tmp_path):
    array = _roundtrip(tmp_path, Image.new("RGB", (2, 2), (255, 0, 0)), "red.png", channels=1)
    assert array[0, 0, 0] == 76  # 0.299 * 255


def test_bilevel(tmp_path):
    image = Image.new("1", (4, 2), 0)
    image.putpixel((1, 0), 1)
    array = _roundtrip(tmp_path, image, "bits.png")
    assert array[0, 1].tolist() == [255, 255, 255]
    assert array[0, 0].tolist() == [0, 0, 0]


@pytest.mark.parametrize(("name", "mode"), [("i16.png", "I;16"), ("i16.tif", "I;16")])
def test_sixteen_bit_scaled_not_clipped(tmp_path, name, mode):
    values = np.array([[65535, 257 * 100, 1000, 0, 128, 129]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == mode
    array = _roundtrip(tmp_path, image, name)
    assert array[0, :, 0].tolist() == [255, 100, 4, 0, 0, 1]


def test_sixteen_bit_big_endian(tmp_path):
    values = np.array([[65535, 257 * 100]], dtype=">u2")
    image = Image.frombytes("I;16B", (2, 1), values.tobytes())
    array = _roundtrip(tmp_path, image, "i16b.tif")
    assert array[0, :, 0].tolist() == [255, 100]


def test_32_bit_integer_clipped_to_16_bit_range(tmp_path):
    values = np.array([[70000, 65535, 257 * 50, -5]], dtype=np.int32)
    array = _roundtrip(tmp_path, Image.fromarray(values, "I"), "i32.tif")
    assert array[0, :, 0].tolist() == [255, 255, 50, 0]


def test_float_in_unit_range_scaled(tmp_path):
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    array = _roundtrip(tmp_path, Image.fromarray(values, "F"), "unit.tif")
    assert array[0, :, 0].tolist() == [0, 128, 255]


def test_float_outside_unit_range_clipped(tmp_path):
    values = np.array([[-3.0, 2.0, 100.4, 300.0]], dtype=np.float32)
    array = _roundtrip(tmp_path, Image.fromarray(values, "F"), "float.tif")
    assert array[0, :, 0].tolist() == [0, 2, 100, 255]


def test_palette_pixel_is_palette_colour(tmp_path):
    image = Image.new("P", (3, 2), 1)
    image.putpalette([0, 0, 0, 10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 9))
    image.putpixel((2, 1), 2)
    array = _roundtrip(tmp_path, image, "palette.png")
    assert array[0, 0].tolist() == [10, 20, 30]
    assert array[1, 2].tolist() == [200, 100, 50]


def test_palette_transparent_colour_is_black(tmp_path):
    image = Image.new("P", (2, 1), 1)
    image.putpalette([0, 0, 0, 10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 9))
    image.putpixel((1, 0), 2)
    image.info["transparency"] = 1
    array = _roundtrip(tmp_path, image, "palette_t.png")
    assert array[0].tolist() == [[0, 0, 0], [200, 100, 50]]


def test_rgba_composited_on_black(tmp_path):
    pixels = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128]]], dtype=np.uint8)
    array = _roundtrip(tmp_path, Image.fromarray(pixels, "RGBA"), "rgba.png")
    assert array[0].tolist() == [[200, 100, 50], [0, 0, 0], [100, 50, 25]]


def test_la_composited_on_black(tmp_path):
    array = _roundtrip(tmp_path, Image.new("LA", (2, 2), (200, 128)), "la.png")
    assert array[0, 0].tolist() == [100, 100, 100]
    assert _roundtrip(tmp_path, Image.new("LA", (2, 2), (200, 128)), "la1.png", channels=1)[0, 0, 0] == 100


def test_cmyk_converted_to_rgb(tmp_path):
    array = _roundtrip(tmp_path, Image.new("CMYK", (2, 2), (0, 255, 0, 0)), "cmyk.tif")
    assert array[0, 0].tolist() == [255, 0, 255]


def test_exif_orientation_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    path = tmp_path / "rotated.jpg"
    Image.new("RGB", (8, 4)).save(path, exif=exif)
    assert load_image(path).shape == (8, 4, 3)


def test_bad_channels():
    with pytest.raises(ValueError, match="channels"):
        load_image("x.png", channels=2)


def _assert_load_error(path, *fragments):
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    message = str(info.value)
    assert path.name in message
    for fragment in fragments:
        assert fragment in message
    assert isinstance(info.value, DatasetError) and isinstance(info.value, ValueError)


def test_missing_file(tmp_path):
    _assert_load_error(tmp_path / "gone.png", "does not exist")


def test_directory(tmp_path):
    (tmp_path / "folder.png").mkdir()
    _assert_load_error(tmp_path / "folder.png", "not a file")


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("hello, not a JPEG")
    _assert_load_error(path, "not an image", "delete it")


def test_corrupt_bytes(tmp_path):
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    _assert_load_error(path, "delete it")


def _encoded(fmt: str) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(("name", "fmt"), [("cut.png", "PNG"), ("cut.jpg", "JPEG")])
def test_truncated_file_raises(tmp_path, name, fmt, monkeypatch):
    path = tmp_path / name
    data = _encoded(fmt)
    path.write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # even when a library enabled it globally
    _assert_load_error(path, "truncated", "Re-export")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
    with pytest.raises(ImageLoadError, match=name):
        check_image(path, full=True)


def test_check_image(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (4, 4)).save(good)
    check_image(good)
    check_image(good, full=True)
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    with pytest.raises(ImageLoadError, match="bad.png"):
        check_image(bad)
    with pytest.raises(ImageLoadError, match="does not exist"):
        check_image(tmp_path / "missing.png")


def test_suffixes():
    assert {".jpg", ".jpeg", ".png", ".webp", ".tif", ".bmp"} <= IMAGE_SUFFIXES
    assert is_image_file("A.JPEG") and not is_image_file("a.txt") and not is_image_file("README")
