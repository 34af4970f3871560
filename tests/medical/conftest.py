from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one intra-op thread per xdist worker: on small machines oversubscription makes tiny models many times slower
    torch.set_num_threads(1)

SHARED_ASSETS = Path(__file__).resolve().parents[3] / "shared" / "assets"


@pytest.fixture
def shared_assets() -> Path:
    """``../shared/assets`` (real data on the development machine); skips the test where it is absent."""
    if not SHARED_ASSETS.is_dir():
        pytest.skip(f"needs {SHARED_ASSETS} (not shipped)")
    return SHARED_ASSETS
