"""Suite-wide fixtures and settings.

Every test gets a temporary cvft cache (converted weights, image-check results, downloads), shared by the session;
tests under :data:`PRIVATE_CACHE_FOLDERS` get an empty one of their own. The Trainer the tests build is
:func:`quiet_trainer.make_trainer`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

#: Test folders whose tests each get a private, empty cvft cache.
PRIVATE_CACHE_FOLDERS = ("backbones", "strategies", "tasks")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one intra-op thread per xdist worker: on small machines oversubscription makes tiny models many times slower
    torch.set_num_threads(1)


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


@pytest.fixture(autouse=True)
def _isolated_cache(request, monkeypatch):
    """An empty cvft cache for each test under :data:`PRIVATE_CACHE_FOLDERS`."""
    if Path(request.node.path).parent.name in PRIVATE_CACHE_FOLDERS:
        monkeypatch.setenv("CVFT_CACHE", str(request.getfixturevalue("tmp_path") / "cvft-cache"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny models
    on oversubscribed threads of a shared machine are many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
