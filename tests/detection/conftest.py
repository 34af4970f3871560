from __future__ import annotations

from pathlib import Path

import pytest

from cvft.data.detection.shapes import write_shapes_detection


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """The generated shapes detection set (64 images of 96 px, ids 3/7/11): COCO json, YOLO labels, data.yaml."""
    return write_shapes_detection(tmp_path_factory.mktemp("shapes") / "shapes")
