"""Planning, resuming and failure handling of `cvft compare`, with a fake worker (no training, fast)."""

from __future__ import annotations

import csv
import json

import pytest

from cvft.cli import main
from cvft.compare import compare
from cvft.errors import ConfigError


def _calls(path) -> list[list[str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _arg(args: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith(name + "="))


def test_resume_reruns_only_unfinished_runs(base_config, fake_worker, tmp_path, capsys):
    table = compare(config=base_config, strategies="linear_probe,lora", seeds=[0, 1])
    folder = table.folder
    assert folder == tmp_path / "runs" / "compare" / "version_0"
    assert len(_calls(fake_worker)) == 4
    out = capsys.readouterr().out
    assert "[4/4] lora seed 1" in out and "ETA" in out
    assert table["strategy"] == ["linear_probe", "lora"]
    assert table["val/acc_mean"] == pytest.approx([0.55, 0.85])

    # interrupted comparison: the last run's result is missing
    results = {p.parent.parent.name + "/" + p.parent.name: p for p in folder.glob("runs/*/seed_*/result.json")}
    assert len(results) == 4
    results.pop("lora/seed_1").unlink()
    mtimes = {key: path.stat().st_mtime_ns for key, path in results.items()}

    resumed = compare(config=base_config, strategies="linear_probe,lora", seeds=[0, 1], resume=folder)
    calls = _calls(fake_worker)
    assert len(calls) == 5, "finished runs must not run again"
    assert json.loads(_arg(calls[-1], "--model.strategies")) == ["lora"] and _arg(calls[-1], "--seed_everything") == "1"
    assert {key: path.stat().st_mtime_ns for key, path in results.items()} == mtimes
    assert "3 done before, skipped" in capsys.readouterr().out
    assert resumed.folder == folder and resumed["runs_ok"] == [2, 2]

    # "last" finds the same comparison; nothing is left to run; no new compare folder is claimed
    again = compare(config=base_config, strategies="linear_probe,lora", seeds=[0, 1], resume="last")
    assert again.folder == folder and len(_calls(fake_worker)) == 5
    assert sorted(p.name for p in (tmp_path / "runs" / "compare").iterdir()) == ["version_0"]


def test_resume_refuses_a_comparison_with_another_budget(base_config, fake_worker):
    table = compare(config=base_config, strategies="lora", seeds=[0])
    with pytest.raises(ConfigError, match="other base configs or overrides"):
        compare(config=base_config, strategies="lora", overrides=["--trainer.max_epochs=9"], resume=table.folder)


def test_runs_share_the_budget_and_differ_only_in_strategies_and_seed(base_config, fake_worker, tmp_path):
    recipe = tmp_path / "my_lora.yaml"
    recipe.write_text("model:\n  lr: 0.5\n  strategies:\n    - name: lora\n      rank: 2\n")
    table = compare(config=base_config, strategies=[str(recipe), "linear_probe+ssf"], seeds="3",
                    overrides=["--data.root", "images/"])  # fmt: skip
    first, second = _calls(fake_worker)
    assert json.loads(_arg(first, "--model.strategies")) == [{"name": "lora", "rank": 2}]
    assert json.loads(_arg(second, "--model.strategies")) == ["linear_probe", "ssf"]
    for args in (first, second):
        assert args[:2] == ["fit", f"--config={base_config}"]
        assert args[2:4] == ["--data.root", "images/"]
        assert _arg(args, "--seed_everything") == "3"
        assert not any("lr" in a for a in args), "a recipe's other keys must not change the budget"
    assert table["strategy"] == ["my_lora", "linear_probe+ssf"]
    assert _arg(first, "--trainer.default_root_dir") == str(table.folder / "runs" / "my_lora" / "seed_3")


def test_failed_runs_are_reported_and_the_comparison_goes_on(base_config, fake_worker, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--config", str(base_config), "--strategies", "bitfit,norm_only,lora", "--seeds", "0,1"])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.err.count("\n") == 1
    assert "3 of 6 runs failed" in captured.err and "--resume" in captured.err
    strategies = [json.loads(_arg(args, "--model.strategies")) for args in _calls(fake_worker)]
    assert strategies.count(["bitfit"]) == 1, "a refused strategy (exit code 2) is not retried with the next seed"
    assert strategies.count(["lora"]) == 2

    folder = tmp_path / "runs" / "compare" / "version_0"
    with (folder / "compare.csv").open() as handle:
        rows = {row["strategy"]: row for row in csv.DictReader(handle)}
    assert rows["bitfit"]["runs_ok"] == "0" and rows["bitfit"]["val/acc_mean"] == ""
    assert "refused for this test" in rows["bitfit"]["error"]
    assert rows["norm_only"]["runs_ok"] == "1" and float(rows["norm_only"]["val/acc_mean"]) == pytest.approx(0.6)
    crashed_log = folder / "runs" / "norm_only" / "seed_1" / "log.txt"
    assert rows["norm_only"]["failed_logs"] == str(crashed_log)
    assert "RuntimeError: crashed mid-way" in rows["norm_only"]["error"]
    assert "crashed mid-way" in crashed_log.read_text()
    assert rows["lora"]["runs_ok"] == "2" and rows["lora"]["failed_logs"] == ""
    markdown = (folder / "compare.md").read_text()
    assert f"1/2 (failed: {crashed_log})" in markdown
    assert (folder / "compare.png").stat().st_size > 0
    assert not (folder / "runs" / "norm_only" / "seed_1" / "result.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strategies", "lorra"], "Did you mean 'lora'"),
        (["--strategies", "linear_probe,missing/recipe.yaml"], "missing/recipe.yaml"),
        (["--strategies", "lora", "--seeds", "0,one"], "'one' is not one"),
        (["--strategies", "lora", "--seeds", "1,1"], "repeats a seed"),
        (["--strategies", "lora,lora"], "more than once"),
        (["--strategies", "lora", "--model.strategies=full"], "--model.strategies cannot be an override"),
        (["--strategies", "lora", "--resume", "nowhere/"], "no comparison there"),
    ],
)
def test_bad_input_exits_2_with_one_message(base_config, fake_worker, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--config", str(base_config), *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("cvft compare: error:") and "Traceback" not in err
    assert fake_worker.read_text() == "", "bad input must be refused before any run starts"


def test_missing_config_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--config", str(tmp_path / "absent.yaml"), "--strategies", "lora"])
    assert exit_.value.code == 2
    assert "absent.yaml does not exist" in capsys.readouterr().err


def test_resume_with_other_strategies_extends_the_plan_and_keeps_the_earlier_rows(base_config, fake_worker):
    first = compare(config=base_config, strategies="linear_probe", seeds=[0, 1])
    assert len(_calls(fake_worker)) == 2
    extended = compare(config=base_config, strategies="lora", seeds=[1, 2], resume=first.folder)
    assert extended.folder == first.folder
    assert extended["strategy"] == ["linear_probe", "lora"]
    assert extended["runs_ok"] == [3, 3], "seed 2 joins the earlier strategy, lora runs all three seeds"
    assert len(_calls(fake_worker)) == 2 + 4
    plan = json.loads((first.folder / "plan.json").read_text())
    assert list(plan["strategies"]) == ["linear_probe", "lora"] and plan["seeds"] == [0, 1, 2]
    again = compare(config=base_config, strategies="lora", seeds=[0], resume="last")
    assert again["strategy"] == ["linear_probe", "lora"] and len(_calls(fake_worker)) == 6


def test_resume_refuses_a_label_planned_with_other_specs(base_config, fake_worker, tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("model:\n  strategies:\n    - name: lora\n      rank: 2\n")
    table = compare(config=base_config, strategies=[str(recipe)], seeds=[0])
    recipe.write_text("model:\n  strategies:\n    - name: lora\n      rank: 4\n")
    with pytest.raises(ConfigError, match="'mine' was planned"):
        compare(config=base_config, strategies=[str(recipe)], seeds=[0], resume=table.folder)
