from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "strategy_callback" / "train.py"


@pytest.mark.slow
def test_strategy_callback_example_runs_and_adds_named_groups(tmp_path, capsys):
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("strategy_callback_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    accuracy = module.main(
        [
            "--backbone",
            "test_resnet",
            "--no-weights",
            "--epochs",
            "3",
            "--limit-batches",
            "0.1",
            "--image-size",
            "32",
            "--output",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert 0.0 <= accuracy <= 1.0
    assert "cvft/layer4.0/decay@0.8" in out, "unfrozen groups must be added to the user's optimizer, named"
    assert "cvft/conv1+bn1/decay" in out, "by the last milestone the stem must have been unfrozen too"
