from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
from PIL import Image
from safetensors.torch import save_file

CLASSES = ("circle", "square", "stripes")


def _draw(kind: str, rng: np.random.Generator, size: int = 40) -> Image.Image:
    canvas = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    if kind == "circle":
        mask = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
        canvas[mask] = (230, 60, 60)
    elif kind == "square":
        canvas[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = (60, 230, 60)
    else:
        canvas[(xx // 4) % 2 == 0] = (60, 60, 230)
    return Image.fromarray(canvas)


@pytest.fixture(scope="session")
def class_names() -> list[str]:
    return list(CLASSES)


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory) -> Path:
    """A learnable 3-class image folder (12 PNGs per class) and a bare folder of 5 unlabelled images."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    for kind in CLASSES:
        (root / "train" / kind).mkdir(parents=True)
        for i in range(12):
            _draw(kind, rng).save(root / "train" / kind / f"{kind}_{i}.png")
    (root / "unlabelled").mkdir()
    for i, kind in enumerate(CLASSES + CLASSES[:2]):
        _draw(kind, rng).save(root / "unlabelled" / f"img_{i}.png")
    return root


@pytest.fixture(scope="session")
def resnet_weights(tmp_path_factory) -> Path:
    """A test_resnet state dict saved as safetensors, standing in for pretrained weights."""
    path = tmp_path_factory.mktemp("weights") / "test_resnet.safetensors"
    model = timm.create_model("test_resnet", num_classes=5)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
