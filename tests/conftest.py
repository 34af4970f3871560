"""Suite-wide fixtures."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_cvft_cache(tmp_path_factory):
    """cvft's cache (converted weights, image-check results, downloads) goes to a temporary folder, not the user's."""
    previous = os.environ.get("CVFT_CACHE")
    os.environ["CVFT_CACHE"] = str(tmp_path_factory.mktemp("cvft_cache"))
    yield
    if previous is None:
        os.environ.pop("CVFT_CACHE", None)
    else:
        os.environ["CVFT_CACHE"] = previous
