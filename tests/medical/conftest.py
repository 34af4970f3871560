from __future__ import annotations

from pathlib import Path

import pytest

SHARED_ASSETS = Path(__file__).resolve().parents[3] / "shared" / "assets"


@pytest.fixture
def shared_assets() -> Path:
    """``../shared/assets`` (real data on the development machine); skips the test where it is absent."""
    if not SHARED_ASSETS.is_dir():
        pytest.skip(f"needs {SHARED_ASSETS} (not shipped)")
    return SHARED_ASSETS
