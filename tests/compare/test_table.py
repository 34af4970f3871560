"""Aggregation of hand-made results: mean ± std over seeds, trainable share, failed runs, CSV and markdown."""

from __future__ import annotations

import csv
import io
import math
import statistics

import pytest

from cvft.compare import build_table, pareto_front, plot_comparison
from cvft.compare.worker import best_row, main_metrics


def _result(label, seed, acc, f1, trainable, speed, wall):
    return {
        "label": label, "seed": seed, "headline": "test/acc",
        "metrics": {"val/acc": acc + 0.05, "test/acc": acc, "test/f1_macro": f1},
        "trainable_params": trainable, "total_params": 1_000_000, "images_per_s": speed,
        "peak_rss_mb": 800.0 + seed, "cuda_peak_mb": None, "wall_s": wall,
    }  # fmt: skip


@pytest.fixture
def table():
    results = [
        _result("lora", 0, 0.70, 0.60, 20_000, 100.0, 10.0),
        _result("lora", 1, 0.80, 0.70, 20_000, 120.0, 12.0),
        _result("lora", 2, 0.90, 0.80, 20_000, 110.0, 14.0),
        _result("linear_probe", 0, 0.60, 0.50, 1_000, 300.0, 5.0),
    ]
    failures = [{"label": "full", "seed": 0, "log": "runs/full/seed_0/log.txt", "error": "cvft: error: out of memory"}]
    return build_table(results, failures, order=["linear_probe", "lora", "full"])


def test_mean_and_sample_std_over_seeds(table):
    lora = table.row("lora")
    assert lora["test/acc_mean"] == pytest.approx(0.8)
    assert lora["test/acc_std"] == pytest.approx(statistics.stdev([0.7, 0.8, 0.9])) == pytest.approx(0.1)
    assert lora["test/f1_macro_mean"] == pytest.approx(0.7) and lora["val/acc_mean"] == pytest.approx(0.85)
    assert lora["images_per_s_mean"] == pytest.approx(110.0) and lora["images_per_s_std"] == pytest.approx(10.0)
    assert lora["wall_s_mean"] == pytest.approx(12.0) and lora["peak_rss_mb"] == 802.0
    assert lora["runs"] == lora["runs_ok"] == 3 and lora["seeds"] == "0 1 2"
    probe = table.row("linear_probe")
    assert probe["test/acc_mean"] == pytest.approx(0.6) and math.isnan(probe["test/acc_std"]), "one seed: no std"


def test_trainable_share_order_and_headline_first(table):
    assert table["strategy"] == ["linear_probe", "lora", "full"]
    assert table["trainable_share"][:2] == [pytest.approx(0.001), pytest.approx(0.02)]
    assert table.metrics == ["test/acc", "val/acc", "test/f1_macro"]
    with pytest.raises(KeyError, match="No column"):
        table["nope"]


def test_failed_strategy_is_a_row_with_its_log(table):
    full = table.row("full")
    assert full["runs"] == 1 and full["runs_ok"] == 0 and math.isnan(full["test/acc_mean"])
    assert full["failed_logs"] == "runs/full/seed_0/log.txt" and "out of memory" in full["error"]


def test_csv_and_markdown(table, tmp_path):
    text = table.to_csv(tmp_path / "compare.csv")
    assert (tmp_path / "compare.csv").read_text() == text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["strategy"] for r in rows] == ["linear_probe", "lora", "full"]
    assert float(rows[1]["test/acc_mean"]) == pytest.approx(0.8) and rows[0]["test/acc_std"] == ""
    assert rows[2]["test/acc_mean"] == "" and rows[2]["failed_logs"] == "runs/full/seed_0/log.txt"
    lines = table.to_markdown().splitlines()
    assert lines[0].startswith("| strategy | test/acc | val/acc | test/f1_macro | trainable params | share")
    assert lines[3].startswith(
        "| lora | 0.8000 ± 0.1000 | 0.8500 ± 0.1000 | 0.7000 ± 0.1000 | 20,000 | 2.00% | 110 ± 10"
    )
    assert lines[2].startswith("| linear_probe | 0.6000 | ")
    assert lines[4].endswith("| 0/1 (failed: runs/full/seed_0/log.txt) |")


def test_pareto_front_on_hand_made_points():
    metric = [0.90, 0.80, 0.70, 0.85, 0.90, float("nan")]
    params = [1000, 10, 20, 500, 2000, 1]
    # 2 is beaten by 1 (better and cheaper), 4 by 0 (as good, cheaper); nan is never on the front
    assert pareto_front(metric, params) == [1, 3, 0]
    speed = [50.0, 200.0, 100.0, 200.0]
    assert pareto_front([0.9, 0.8, 0.7, 0.8], speed, lower_cost_is_better=False) == [0, 1, 3]
    assert pareto_front([], []) == []


def test_plot_writes_a_png(table, tmp_path):
    path = plot_comparison(table, tmp_path / "compare.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["compare.png"], "no temporary file is left behind"


def test_task_metrics_for_medical_and_detection(tmp_path):
    report = {"auroc_macro": 0.93, "sensitivity_macro": 0.81, "specificity_macro": 0.77}
    assert main_metrics("medical", "test", {"test/acc": 0.88, "test/loss": 0.2}, report) == {
        "test/acc": 0.88, "test/auroc": 0.93, "test/sensitivity": 0.81, "test/specificity": 0.77,
    }  # fmt: skip
    logged = {"val/map": 0.4, "val/map_50": 0.7, "val/map_75": 0.3, "val/loss": 1.0}
    assert main_metrics("detection", "val", logged) == {"val/map": 0.4, "val/map_50": 0.7}
    metrics_csv = tmp_path / "metrics.csv"
    metrics_csv.write_text(
        "epoch,step,train/loss,val/map,val/map_50\n0,3,1.0,,\n0,3,,0.2,0.5\n1,7,,0.4,0.6\n2,11,,0.3,0.9\n"
    )
    assert best_row(metrics_csv, "val/map") == {"epoch": 1.0, "step": 7.0, "val/map": 0.4, "val/map_50": 0.6}
    assert best_row(metrics_csv, "val/loss") == {}
