"""The ``cvft`` command: which CLI a command line runs.

``cvft export|compare|explain ...`` run their own tools (:data:`TOOLS`); every other command line is a LightningCLI
run (``fit``, ``validate``, ``test``, ``predict``, and ``lr-find``: the learning-rate finder only) of the task it
names (:func:`find_task`): ``--task``, else the top-level ``task:`` of its ``--config`` files, else classification.
Errors that cvft raises end the command with a one-line message and exit status 2.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import cvft.cli.classification as classification
import cvft.cli.detection as detection
from cvft.errors import CvftError

__all__ = ["TASKS", "TOOLS", "find_task", "main"]

#: The tasks a LightningCLI run can train.
TASKS = ("classification", "detection", "medical")
#: Sub-commands that are not LightningCLI runs: name -> module whose ``main(argv)`` runs them (imported when used).
TOOLS = {"export": "cvft.export", "compare": "cvft.compare.cli", "explain": "cvft.medical.explain_cli"}

_SUBCOMMANDS = ("fit", "validate", "test", "predict", "lr-find")


def _task_in_config(path: str) -> str | None:
    """The top-level ``task:`` of a YAML config file (or of its subcommand section), None when it names none."""
    import yaml

    file = Path(path)
    if not file.is_file():
        return None  # LightningCLI reports the missing file (or parses an inline YAML string)
    try:
        config = yaml.safe_load(file.read_text())
    except yaml.YAMLError:
        return None  # LightningCLI reports the syntax error with its position
    if not isinstance(config, dict):
        return None
    sections = [config] + [config[name] for name in _SUBCOMMANDS if isinstance(config.get(name), dict)]
    found = [section["task"] for section in sections if "task" in section]
    return str(found[-1]) if found else None


def find_task(argv: list[str]) -> str:
    """The task a ``cvft`` command line asks for: ``--task``, else the last ``task:`` of its ``--config`` files.

    Args:
        argv: The arguments after ``cvft`` (``["fit", "--config", "x.yaml", ...]``).

    Returns:
        One of :data:`TASKS`; ``"classification"`` when nothing names a task.

    Raises:
        CvftError: The task named is not one of :data:`TASKS`.

    Example:
        >>> find_task(["fit", "--data.root", "images/"]), find_task(["predict", "--task=detection"])
        ('classification', 'detection')
    """
    task, source = None, None
    for i, arg in enumerate(argv):
        name, equals, value = arg.partition("=")
        if not equals:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        if name == "--task":
            task, source = value, "--task"
        elif name in ("--config", "-c") and source != "--task":  # --task wins wherever it stands
            from_file = _task_in_config(value)
            if from_file is not None:
                task, source = from_file, value
    if task is None:
        return "classification"
    if task not in TASKS:
        raise CvftError(
            f"Unknown task {task!r} (from {source}); choose one of {', '.join(TASKS)} "
            "(set it with `task: detection` at the top of the config file or with --task)."
        )
    return task


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``cvft`` console script."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] and argv[0] in TOOLS:
        tool = importlib.import_module(TOOLS[argv[0]])
        try:
            raise SystemExit(tool.main(argv[1:]))
        except CvftError as err:
            print(f"cvft {argv[0]}: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
    try:
        task = find_task(argv)
        if task == "detection":
            detection.run_detection_cli(args)
        else:
            classification.run_classification_cli(args, task)
    except CvftError as err:
        print(f"cvft: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
