from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "continual" / "run_sequence.py"


@pytest.mark.slow
def test_continual_example_runs_and_writes_a_forgetting_table(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("continual_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    forgetting = module.main(
        ["--methods", "finetune", "adapter_per_task", "--epochs", "1", "--images", "32", "--output", str(tmp_path)]
    )
    assert set(forgetting) == {"finetune", "adapter_per_task"}
    assert all(math.isfinite(v) for v in forgetting.values())
    assert abs(forgetting["adapter_per_task"]) < 1e-9  # each task keeps its own adapter: nothing is forgotten
    written = sorted(p.name for p in tmp_path.glob("*.csv"))
    assert written == ["continual_adapter_per_task.csv", "continual_finetune.csv"]
    assert "avg forgetting" in capsys.readouterr().out
