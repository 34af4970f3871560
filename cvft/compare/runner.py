"""Planning, running and resuming a comparison of strategies on the same data and budget.

A comparison lives in one folder, ``<trainer.default_root_dir>/compare/version_<n>/`` (claimed atomically with
:func:`cvft.runs.claim_run_folder`)::

    plan.json                       base configs, overrides, their hash, strategies, seeds
    compare.csv  compare.md  compare.png
    runs/<strategy>/seed_<s>/       the fit's trainer.default_root_dir (cvft/version_0/ or detection/version_0/)
        log.txt                     everything the fit printed
        fit.json                    what the fit's process measured (written by cvft.compare.worker)
        result.json                 fit.json + wall time: the run is done (written atomically, last)
        failure.json                exit code, log and error of a failed attempt (retried on resume)

Every fit runs in a process of its own (``python -m cvft.compare.worker``), so no Lightning or global state leaks
from one run into the next and peak memory is the run's own. Fits differ only in ``model.strategies`` and
``seed_everything``; everything else (data, split seed, epochs, learning rate ...) comes from the same base config
and overrides. **Resuming** is explicit: ``resume=<compare folder>`` (or ``"last"``: the newest comparison under the
root made with the same config hash) skips every run whose ``result.json`` exists and reruns the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from cvft.atomic import read_json, write_json_atomic
from cvft.compare.plot import plot_comparison
from cvft.compare.table import CompareTable, build_table
from cvft.errors import ConfigError, CvftError

__all__ = ["PlannedRun", "compare", "parse_seeds", "parse_strategies", "WORKER"]

#: The command that runs one fit; its arguments are ``<fit.json> fit ...``.
WORKER: tuple[str, ...] = (sys.executable, "-m", "cvft.compare.worker")

#: Options a comparison sets itself for every fit; giving them as overrides is refused.
_OWNED_OPTIONS = {
    "--model.strategies": "pass strategies with --strategies",
    "--seed_everything": "pass seeds with --seeds",
    "--ckpt_path": "a comparison starts every fit fresh; resume a comparison with --resume",
    "--config": "pass base configs with --config before the overrides",
}


@dataclass(frozen=True)
class PlannedRun:
    """One fit of a comparison: a strategy (label and specs) with one seed, in its own folder."""

    label: str
    strategies: list[Any]
    seed: int
    folder: Path

    @property
    def result_path(self) -> Path:
        """``result.json``: exists once the run is done."""
        return self.folder / "result.json"

    @property
    def fit_path(self) -> Path:
        """``fit.json``, written by the fit's process."""
        return self.folder / "fit.json"

    @property
    def failure_path(self) -> Path:
        """``failure.json`` of the latest failed attempt."""
        return self.folder / "failure.json"

    @property
    def log_path(self) -> Path:
        """``log.txt``: the fit's output."""
        return self.folder / "log.txt"


def parse_seeds(seeds: str | int | Sequence[int | str] | None) -> list[int]:
    """Seeds from ``"0,1,2"``, an int or a sequence; refused unless they are distinct integers.

    Example:
        >>> parse_seeds("0, 1,2"), parse_seeds(3), parse_seeds(None)
        ([0, 1, 2], [3], [0])
    """
    if seeds is None:
        return [0]
    items = seeds.split(",") if isinstance(seeds, str) else [seeds] if isinstance(seeds, int) else list(seeds)
    parsed = []
    for item in items:
        text = str(item).strip()
        try:
            if isinstance(item, bool) or (isinstance(item, float) and not item.is_integer()):
                raise ValueError
            parsed.append(int(text))
        except ValueError:
            raise ConfigError(
                f"--seeds takes whole numbers separated by commas (e.g. --seeds 0,1,2); {text!r} is not one."
            ) from None
    if not parsed:
        raise ConfigError("--seeds is empty; give at least one seed (e.g. --seeds 0).")
    if len(set(parsed)) != len(parsed):
        raise ConfigError(f"--seeds repeats a seed: {seeds!r}; give each seed once.")
    return parsed


def parse_strategies(strategies: str | Sequence[str]) -> list[tuple[str, list[Any]]]:
    """``(label, model.strategies)`` pairs from names, ``a+b`` stacks and recipe YAML files.

    * ``lora`` -> ``("lora", ["lora"])``; the name must be registered (:func:`cvft.strategies.get_strategy`).
    * ``lora+supcon`` -> ``("lora+supcon", ["lora", "supcon"])``: strategies stacked in one run.
    * ``configs/resnet_lora.yaml`` -> ``("resnet_lora", <the recipe's model.strategies>)``: only the recipe's
      strategies are used; its other keys (learning rate ...) are not, so every run keeps the same budget.

    Raises:
        StrategyError: An unknown strategy name (with close matches).
        ConfigError: A recipe that is missing, unreadable or names no ``model.strategies``; labels given twice.
    """
    from cvft.strategies import get_strategy

    items = strategies.split(",") if isinstance(strategies, str) else list(strategies)
    items = [str(item).strip() for item in items if str(item).strip()]
    if not items:
        raise ConfigError("--strategies is empty; name at least one, e.g. --strategies linear_probe,lora.")
    planned: list[tuple[str, list[Any]]] = []
    for item in items:
        if item.endswith((".yaml", ".yml")) or os.sep in item or "/" in item:
            planned.append((Path(item).stem, _recipe_strategies(Path(item))))
        else:
            names = [part.strip() for part in item.split("+") if part.strip()]
            for name in names:
                get_strategy(name)
            planned.append((item, names))
    labels = [label for label, _ in planned]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ConfigError(
            f"--strategies names {', '.join(repeated)} more than once (recipes are labelled by file name); "
            "give each strategy once, or rename one recipe file."
        )
    return planned


def _recipe_strategies(path: Path) -> list[Any]:
    import yaml

    if not path.is_file():
        raise ConfigError(
            f"Recipe file {path} (from --strategies) does not exist (looked in {path.resolve().parent}); "
            "give a path to a YAML file with model.strategies, or a strategy name."
        )
    try:
        recipe = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"Recipe file {path} is not valid YAML: {err}") from None
    model = (recipe or {}).get("model") if isinstance(recipe, dict) else None
    if not isinstance(model, dict) and isinstance(recipe, dict) and isinstance(recipe.get("fit"), dict):
        model = recipe["fit"].get("model")
    specs = model.get("strategies") if isinstance(model, dict) else None
    if not specs:
        raise ConfigError(
            f"Recipe file {path} has no model.strategies; a recipe passed to --strategies must name the strategies "
            "it compares (see configs/linear_probe.yaml)."
        )
    if isinstance(specs, str):
        specs = [part.strip() for part in specs.split(",") if part.strip()]
    return list(specs) if isinstance(specs, list) else [specs]


def _option(overrides: Sequence[str], name: str) -> str | None:
    """The last value given to ``name`` (``--name value`` or ``--name=value``) in ``overrides``."""
    value = None
    for i, arg in enumerate(overrides):
        if arg == name and i + 1 < len(overrides):
            value = overrides[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def _check_overrides(overrides: Sequence[str]) -> None:
    for arg in overrides:
        name = arg.split("=", 1)[0]
        if name in _OWNED_OPTIONS or name.startswith("--model.strategies"):
            why = _OWNED_OPTIONS.get(name, _OWNED_OPTIONS["--model.strategies"])
            raise ConfigError(f"{name} cannot be an override of `cvft compare`: every run sets it itself ({why}).")


def _root_dir(configs: Sequence[Path], overrides: Sequence[str]) -> Path:
    """``trainer.default_root_dir`` as the fits would see it: the overrides, else the last config naming it."""
    import yaml

    given = _option(overrides, "--trainer.default_root_dir")
    if given:
        return Path(given)
    root = "runs"
    for config in configs:
        data = yaml.safe_load(config.read_text()) or {}
        for section in (data, data.get("fit") if isinstance(data.get("fit"), dict) else {}):
            trainer = section.get("trainer") if isinstance(section, dict) else None
            if isinstance(trainer, dict) and trainer.get("default_root_dir"):
                root = str(trainer["default_root_dir"])
    return Path(root)


def config_hash(configs: Sequence[Path], overrides: Sequence[str]) -> str:
    """What decides a comparison's budget: the base configs' contents and the overrides (16 hex digits)."""
    digest = hashlib.sha256()
    for config in configs:
        digest.update(config.read_bytes())
        digest.update(b"\0")
    digest.update(json.dumps(list(overrides)).encode())
    return digest.hexdigest()[:16]


def _find_resume(resume: str | Path, root: Path, digest: str) -> Path:
    if str(resume) == "last":
        candidates = sorted(
            (
                p
                for p in (root / "compare").glob("version_*")
                if (read_json(p / "plan.json") or {}).get("hash") == digest
            ),
            key=lambda p: int(p.name.split("_")[-1]) if p.name.split("_")[-1].isdigit() else -1,
        )
        if not candidates:
            raise CvftError(
                f"--resume last found no comparison with this config under {root / 'compare'}; "
                "leave --resume out to start one, or pass the folder to resume."
            )
        return candidates[-1]
    folder = Path(resume)
    plan = read_json(folder / "plan.json")
    if plan is None:
        raise CvftError(
            f"--resume {folder}: no comparison there (no readable {folder / 'plan.json'}). Pass a folder made by "
            "`cvft compare` (e.g. runs/compare/version_0), or leave --resume out to start a new comparison."
        )
    if plan.get("hash") != digest:
        raise ConfigError(
            f"--resume {folder}: that comparison was made with other base configs or overrides "
            f"({' '.join(plan.get('configs', []))} {shlex.join(plan.get('overrides', []))}); its runs would not share "
            "this budget. Use the same --config and overrides, or leave --resume out to start a new comparison."
        )
    return folder


def _extended_plan(
    stored: dict[str, Any], strategies: list[tuple[str, list[Any]]], seeds: list[int]
) -> tuple[list[tuple[str, list[Any]]], list[int]]:
    """The resumed comparison's strategies and seeds: those planned before, then the ones this call adds.

    Resuming never drops a planned row from the table; asking for a subset still finishes and tabulates the rest.

    Raises:
        ConfigError: A strategy label of this call was planned before with other specs.
    """
    planned = dict(stored.get("strategies") or {})
    for label, specs in strategies:
        if label in planned and json.dumps(planned[label], sort_keys=True) != json.dumps(specs, sort_keys=True):
            raise ConfigError(
                f"--resume: strategy {label!r} was planned in that comparison as {planned[label]}, now {specs}. "
                "Give the new recipe another file name, or leave --resume out to start a new comparison."
            )
        planned.setdefault(label, specs)
    seeds = [*stored.get("seeds", []), *(seed for seed in seeds if seed not in stored.get("seeds", []))]
    return list(planned.items()), seeds


def _fit_command(
    worker: Sequence[str], run: PlannedRun, configs: Sequence[Path], overrides: Sequence[str]
) -> list[str]:
    return [
        *worker,
        str(run.fit_path),
        "fit",
        *[f"--config={config}" for config in configs],
        *overrides,
        f"--model.strategies={json.dumps(run.strategies)}",
        f"--seed_everything={run.seed}",
        f"--trainer.default_root_dir={run.folder}",
    ]


def _last_error(log: Path) -> str:
    """The last ``error:`` line of a log (cvft's one-line errors, Python's last exception line otherwise)."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if "error:" in line.lower() or line.split(":", 1)[0].endswith(("Error", "Exception", "Interrupt")):
            return line[:500]
    return lines[-1][:500] if lines else ""


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m {seconds % 60:02d}s"
    )


def compare(
    config: str | Path | Sequence[str | Path],
    strategies: str | Sequence[str],
    seeds: str | int | Sequence[int] | None = None,
    overrides: Sequence[str] = (),
    resume: str | Path | None = None,
    metric: str | None = None,
    worker: Sequence[str] | None = None,
    stream: TextIO | None = None,
) -> CompareTable:
    """Fit every strategy with every seed on the same data and budget, and tabulate and plot the results.

    Args:
        config: The base ``cvft fit`` config file(s), applied in order.
        strategies: Names (``lora``), stacks (``lora+supcon``) or recipe YAML files, as a list or comma-separated.
        seeds: ``seed_everything`` of each run (``"0,1,2"`` or a list); ``[0]`` by default.
        overrides: ``cvft fit`` options applied to every run after the configs (``["--data.root=images/"]``).
        resume: A comparison folder to continue (or ``"last"``); finished runs are skipped, the others rerun.
            Strategies and seeds of this call that the comparison lacks are added to it; those it planned before
            stay in its plan and table, so resuming with fewer never drops rows.
        metric: The metric to plot (``test/acc`` ...); the task's headline metric by default.
        worker: The command that runs one fit, given ``<fit.json> fit ...`` (default :data:`WORKER`).
        stream: Where progress goes (``sys.stdout`` by default).

    Returns:
        The table (also written as ``compare.csv`` and ``compare.md`` beside ``compare.png`` in
        :attr:`CompareTable.folder`). Failed runs are rows (or parts of rows) with their log paths; the function
        does not raise for them.

    Raises:
        ConfigError, StrategyError: Bad input (missing config or recipe, unknown strategy, seeds not integers ...),
            before any run starts.
    """
    from cvft.cli import find_task
    from cvft.runs import claim_run_folder

    out = stream if stream is not None else sys.stdout
    configs = [Path(c) for c in ([config] if isinstance(config, str | os.PathLike) else list(config))]
    if not configs:
        raise ConfigError("cvft compare needs a base config: --config base.yaml.")
    for path in configs:
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist (looked in {path.resolve().parent}).")
    overrides = [str(arg) for arg in overrides]
    _check_overrides(overrides)
    planned_strategies = parse_strategies(strategies)
    seed_list = parse_seeds(seeds)
    task = find_task(["fit", *[f"--config={c}" for c in configs], *overrides])
    root = _root_dir(configs, overrides)
    digest = config_hash(configs, overrides)

    if resume is not None:
        folder = _find_resume(resume, root, digest)
        stored = read_json(folder / "plan.json") or {}
        planned_strategies, seed_list = _extended_plan(stored, planned_strategies, seed_list)
    else:
        folder = root / "compare" / f"version_{claim_run_folder(root, 'compare')}"
    plan = [
        PlannedRun(label, specs, seed, folder / "runs" / _safe(label) / f"seed_{seed}")
        for label, specs in planned_strategies
        for seed in seed_list
    ]
    write_json_atomic(
        folder / "plan.json",
        {
            "hash": digest,
            "task": task,
            "configs": [str(c) for c in configs],
            "overrides": overrides,
            "strategies": {label: specs for label, specs in planned_strategies},
            "seeds": seed_list,
        },
    )
    todo = [run for run in plan if read_json(run.result_path) is None]
    print(
        f"cvft compare: {len(plan)} runs ({len(planned_strategies)} strategies x {len(seed_list)} seeds, task {task}) "
        f"in {folder}" + (f"; {len(plan) - len(todo)} done before, skipped" if len(todo) < len(plan) else ""),
        file=out,
        flush=True,
    )
    _execute(todo, len(plan) - len(todo), len(plan), configs, overrides, worker or WORKER, out)

    results, failures = [], []
    for run in plan:
        result = read_json(run.result_path)
        if result is not None:
            results.append({**result, "label": run.label, "seed": run.seed})
        else:
            failure = read_json(run.failure_path) or {"log": str(run.log_path), "error": "did not run"}
            failures.append({**failure, "label": run.label, "seed": run.seed})
    table = build_table(results, failures, order=[label for label, _ in planned_strategies], folder=folder)
    table.to_csv(folder / "compare.csv")
    table.to_markdown(folder / "compare.md")
    plot_comparison(table, folder / "compare.png", metric=metric)
    overheads = [
        r["wall_s"] - r["fit_s"] for r in results if r.get("wall_s") is not None and r.get("fit_s") is not None
    ]
    print("\n" + table.to_markdown(), file=out)
    if overheads:
        print(
            f"Each run's own process cost {statistics.median(overheads):.1f} s (median) to start (Python, imports) "
            "before its fit began.",
            file=out,
        )
    print(
        f"Comparison: {folder / 'compare.md'}, {folder / 'compare.csv'}, {folder / 'compare.png'}", file=out, flush=True
    )
    return table


def _execute(
    todo: list[PlannedRun],
    done: int,
    total: int,
    configs: Sequence[Path],
    overrides: Sequence[str],
    worker: Sequence[str],
    out: TextIO,
) -> None:
    """Run ``todo`` one after another, printing progress and an ETA after each run."""
    walls: list[float] = []
    refused: dict[str, PlannedRun] = {}  # label -> the run whose bad input (exit code 2) any seed would repeat
    for index, run in enumerate(todo):
        run.folder.mkdir(parents=True, exist_ok=True)
        if run.label in refused:
            first = refused[run.label]
            failure = read_json(first.failure_path) or {}
            write_json_atomic(
                run.failure_path,
                {
                    **failure,
                    "skipped": True,
                    "error": f"not run: seed {first.seed} was refused ({failure.get('error', '')})",
                },
            )
            done += 1
            print(
                f"[{done}/{total}] {run.label} seed {run.seed}: skipped (seed {first.seed} was refused)",
                file=out,
                flush=True,
            )
            continue
        print(f"[{done}/{total}] {run.label} seed {run.seed}: running (log {run.log_path})", file=out, flush=True)
        run.fit_path.unlink(missing_ok=True)
        started = time.perf_counter()
        with run.log_path.open("w") as log:
            code = subprocess.run(
                _fit_command(worker, run, configs, overrides), stdout=log, stderr=subprocess.STDOUT, check=False
            ).returncode
        wall = time.perf_counter() - started
        walls.append(wall)
        done += 1
        measured = read_json(run.fit_path) if code == 0 else None
        if measured is not None:
            write_json_atomic(
                run.result_path,
                {**measured, "label": run.label, "seed": run.seed, "strategies": run.strategies, "wall_s": wall,
                 "log": str(run.log_path)},
            )  # fmt: skip
            run.failure_path.unlink(missing_ok=True)
            headline = measured.get("headline")
            value = measured.get("metrics", {}).get(headline)
            status = f"{headline} {value:.4f}" if isinstance(value, int | float) else "done"
        else:
            error = _last_error(run.log_path) if code else "the fit wrote no fit.json"
            write_json_atomic(run.failure_path, {"exit_code": code, "log": str(run.log_path), "error": error})
            status = f"FAILED (exit code {code}; log {run.log_path})"
            if code == 2:
                refused[run.label] = run
        remaining = len(todo) - index - 1
        eta = statistics.fmean(walls) * remaining
        print(
            f"[{done}/{total}] {run.label} seed {run.seed}: {status} in {wall:.1f} s | ETA {_duration(eta)}",
            file=out,
            flush=True,
        )


def _safe(label: str) -> str:
    """A folder name for a label (``lora+supcon`` stays readable; path separators do not survive)."""
    return "".join(ch if ch.isalnum() or ch in "+-_." else "_" for ch in label) or "strategy"
