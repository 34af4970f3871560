from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cvft.data.demo import write_demo_image_folder


def _save_image(path: Path, value: int = 128, size: tuple[int, int] = (16, 16), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").convert(mode).save(path)
    return path


@pytest.fixture
def save_image() -> Callable[..., Path]:
    """Write a small random image: save_image(path, value=seed, size=(w, h), mode="RGB")."""
    return _save_image


@pytest.fixture
def make_class_folders(tmp_path) -> Callable[..., Path]:
    """make_class_folders({"cat": 3, "dog": 2}, root=None) -> root with one folder of PNGs per class."""

    def make(counts: dict[str, int], root: Path | None = None, suffix: str = ".png") -> Path:
        root = root or tmp_path / "images"
        for c, (name, count) in enumerate(counts.items()):
            for i in range(count):
                _save_image(root / name / f"{i:03d}{suffix}", value=100 * c + i)
        return root

    return make


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """Real handwritten digits, 6 per class, 32 px."""
    return write_demo_image_folder("digits", tmp_path_factory.mktemp("demo") / "digits", limit_per_class=6)
