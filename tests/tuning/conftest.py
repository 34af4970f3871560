from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """Three classes of 8 noisy 36 px PNGs each, brighter by class (18 train / 6 val images at 0.25)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in range(3):
        (root / f"class{label}").mkdir()
        for i in range(8):
            pixels = rng.integers(0, 256, (36, 36, 3)) // 2 + 40 * label
            Image.fromarray(pixels.astype(np.uint8)).save(root / f"class{label}" / f"{i}.png")
    return root


@pytest.fixture
def adamw_rates(monkeypatch) -> list[dict[str, float]]:
    """Filled as the test runs: the rate of every named param group at each ``AdamW`` step of the test."""
    seen: list[dict[str, float]] = []
    original = torch.optim.AdamW.step

    def record(self, *args, **kwargs):
        seen.append({group["name"]: group["lr"] for group in self.param_groups})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    return seen
