from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from cvft.data.demo import FASHION_MNIST_CLASSES, write_demo_image_folder
from cvft.data.io import load_image
from cvft.data.samples import scan_class_folders
from cvft.errors import DatasetError

REPO = Path(__file__).resolve().parents[2]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_digits_folder_is_loadable(digits_root):
    samples, names = scan_class_folders(digits_root)
    assert names == [str(d) for d in range(10)]
    assert len(samples) == 60
    image = load_image(samples[0].path)
    assert image.shape == (32, 32, 3) and image.max() > 200 and image.min() == 0
    assert "CC BY 4.0" in (digits_root / "README.md").read_text()


def test_digits_deterministic_and_rerun(tmp_path, digits_root):
    again = write_demo_image_folder("digits", tmp_path / "again", limit_per_class=6)
    assert _files(again) == _files(digits_root)
    other_seed = write_demo_image_folder("digits", tmp_path / "seed1", limit_per_class=6, seed=1)
    assert _files(other_seed).keys() != _files(digits_root).keys()
    assert write_demo_image_folder("digits", again, limit_per_class=6) == again  # same arguments: no-op
    with pytest.raises(DatasetError, match="other arguments"):
        write_demo_image_folder("digits", again, limit_per_class=7)


def test_refuses_foreign_folder_and_unknown_source(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not empty"):
        write_demo_image_folder("digits", tmp_path, limit_per_class=1)
    with pytest.raises(DatasetError, match="digits"):
        write_demo_image_folder("lfw", tmp_path / "x")


def test_digits_image_size(tmp_path):
    root = write_demo_image_folder("digits", tmp_path / "d", limit_per_class=1, image_size=64)
    assert load_image(next(root.rglob("*.png"))).shape == (64, 64, 3)


def test_skimage_textures(tmp_path):
    root = write_demo_image_folder("skimage", tmp_path / "tex", limit_per_class=2, image_size=24)
    samples, names = scan_class_folders(root)
    assert names == ["brick", "grass", "gravel", "retina", "space", "tissue"]
    assert len(samples) == 12 and load_image(samples[0].path).shape == (24, 24, 3)


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_idx_files(tmp_path, monkeypatch):
    labels = np.array([0, 9, 9, 3, 0])
    images = np.stack([np.full((28, 28), 10 * i) for i in range(5)])
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, 2051)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels, 2049)
    monkeypatch.setenv("CVFT_FASHION_MNIST_DIR", str(tmp_path))
    root = write_demo_image_folder("fashion-mnist", tmp_path / "out", limit_per_class=1)
    samples, names = scan_class_folders(root)
    assert names == sorted(FASHION_MNIST_CLASSES[i] for i in (0, 3, 9))
    assert len(samples) == 3 and load_image(samples[0].path).shape == (28, 28, 3)


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CVFT_FASHION_MNIST_DIR", str(tmp_path / "none"))
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        write_demo_image_folder("fashion-mnist", tmp_path / "out")


def test_make_image_folder_script(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_image_folder", REPO / "datasets" / "make_image_folder.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["digits", str(tmp_path / "out"), "--limit-per-class", "2", "--image-size", "16"]) == 0
    assert "20 images in 10 classes" in capsys.readouterr().out
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("x")
    assert script.main(["digits", str(tmp_path / "busy")]) == 2
    assert "not empty" in capsys.readouterr().err
