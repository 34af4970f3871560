from __future__ import annotations

import sys
from pathlib import Path

import pytest

FAKE_WORKER = [sys.executable, str(Path(__file__).with_name("fake_worker.py"))]


@pytest.fixture
def base_config(tmp_path) -> Path:
    """A base config whose runs go under tmp_path/runs (the fake worker never reads it)."""
    path = tmp_path / "base.yaml"
    path.write_text(
        f"trainer:\n  max_epochs: 1\n  default_root_dir: {tmp_path / 'runs'}\nmodel:\n  backbone: test_resnet\n"
    )
    return path


@pytest.fixture
def fake_worker(tmp_path, monkeypatch) -> Path:
    """Every fit runs fake_worker.py; returns the file that lists the calls, one JSON list of arguments a line."""
    calls = tmp_path / "calls.jsonl"
    calls.touch()
    monkeypatch.setenv("CVFT_FAKE_CALLS", str(calls))
    monkeypatch.setattr("cvft.compare.runner.WORKER", tuple(FAKE_WORKER))
    return calls
