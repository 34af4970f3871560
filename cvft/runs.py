"""Run folders: claiming ``<root>/<name>/version_<n>`` atomically, and resuming a run in its own folder.

A fit writes everything into one run folder (checkpoints, ``metrics.csv``, TensorBoard events, pictures). Two rules
keep that folder whole:

* **Claiming is atomic.** :func:`claim_run_folder` creates ``version_<n>`` with ``mkdir`` (no ``exist_ok``) and
  takes the next number when another process got there first, so two fits started together never share a folder.
* **Resuming continues the run.** :func:`resume_point` finds the checkpoint (``"last"``: the newest ``last.ckpt``
  under the root) and its run folder; :func:`run_loggers` then logs into that folder, keeping the ``metrics.csv``
  rows and TensorBoard events from before the checkpoint and dropping those of the interrupted part.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from cvft.atomic import atomic_path
from cvft.errors import CvftError

__all__ = [
    "ResumePoint",
    "claim_run_folder",
    "find_last_checkpoint",
    "resume_point",
    "run_loggers",
    "ResumingCSVLogger",
]

_VERSION = re.compile(r"version_(\d+)")
_SPECIAL_CKPT_PATHS = ("hpc", "registry")


@dataclass(frozen=True)
class ResumePoint:
    """Where a fit resumes from.

    Attributes:
        ckpt_path: The checkpoint file.
        global_step: The checkpoint's optimizer step count: logs at or after it belong to the interrupted part.
        save_dir: Root of the run folder (``<save_dir>/<name>/version_<version>``), or ``None`` when the checkpoint
            does not lie in a run folder (then the resumed fit gets a new one).
        name: Run name (``cvft``, ``detection``), with ``save_dir``.
        version: Run folder number, with ``save_dir``.
        hyper_parameters: The checkpoint's ``hyper_parameters``.
        datamodule_hyper_parameters: The checkpoint's ``datamodule_hyper_parameters`` (the DataModule's arguments,
            e.g. its saved ``eval_transform``).
    """

    ckpt_path: Path
    global_step: int
    save_dir: Path | None = None
    name: str | None = None
    version: int | None = None
    hyper_parameters: dict[str, Any] = field(default_factory=dict)
    datamodule_hyper_parameters: dict[str, Any] = field(default_factory=dict)


def _versions(parent: Path) -> list[int]:
    if not parent.is_dir():
        return []
    return [int(m.group(1)) for p in parent.iterdir() if p.is_dir() and (m := _VERSION.fullmatch(p.name))]


def claim_run_folder(root: str | os.PathLike[str], name: str) -> int:
    """Create the next free ``<root>/<name>/version_<n>`` atomically and return ``n``.

    ``mkdir`` without ``exist_ok`` fails when another process created the folder first; then the next number is
    tried. Every process therefore gets a folder of its own.

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> claim_run_folder(root, "cvft"), claim_run_folder(root, "cvft")
        (0, 1)
    """
    parent = Path(root) / name
    parent.mkdir(parents=True, exist_ok=True)
    version = max(_versions(parent), default=-1) + 1
    while True:
        try:
            (parent / f"version_{version}").mkdir()
        except FileExistsError:
            version += 1
            continue
        return version


def find_last_checkpoint(root: str | os.PathLike[str], name: str) -> Path:
    """The most recently written ``last*.ckpt`` in ``<root>/<name>/version_*/checkpoints/``.

    Raises:
        CvftError: There is none; the message names the folder searched and the ways out.
    """
    parent = Path(root) / name
    found = [
        path
        for version in _versions(parent)
        for path in (parent / f"version_{version}" / "checkpoints").glob("last*.ckpt")
        if path.is_file()
    ]
    if not found:
        raise CvftError(
            f"--ckpt_path last found no checkpoint to resume: no {parent}/version_*/checkpoints/last.ckpt exists. "
            "Start the fit without --ckpt_path, pass the checkpoint's path, or set --trainer.default_root_dir to the "
            "folder of the run to resume."
        )
    return max(found, key=lambda path: path.stat().st_mtime_ns)


def resume_point(ckpt_path: str, root: str | os.PathLike[str], name: str) -> ResumePoint | None:
    """Resolve ``--ckpt_path`` of a fit: ``"last"`` or a path; read it safely; find its run folder.

    Args:
        ckpt_path: ``"last"``, a local path or URL; Lightning's ``"hpc"`` and ``"registry"`` are left to Lightning.
        root: ``trainer.default_root_dir``.
        name: The run name (``cvft``, ``detection``).

    Returns:
        The resume point, or ``None`` for the keywords left to Lightning.

    Raises:
        CvftError: ``"last"`` found nothing; the file is missing, unsafe or not a Lightning checkpoint.
    """
    if ckpt_path in _SPECIAL_CKPT_PATHS:
        return None
    from cvft.checkpoints import download, is_url, load_checkpoint

    if ckpt_path == "last":
        path = find_last_checkpoint(root, name)
    elif is_url(ckpt_path):
        path = download(ckpt_path)
    else:
        path = Path(ckpt_path)
    checkpoint = load_checkpoint(path, require_lightning=True)
    step = int(checkpoint.get("global_step", 0))
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    data_hparams = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    folder = path.parent.parent
    match = _VERSION.fullmatch(folder.name)
    if path.parent.name != "checkpoints" or match is None:
        return ResumePoint(path, step, hyper_parameters=hparams, datamodule_hyper_parameters=data_hparams)
    run = (folder.parent.parent, folder.parent.name, int(match.group(1)))
    return ResumePoint(path, step, *run, hyper_parameters=hparams, datamodule_hyper_parameters=data_hparams)


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing ``metrics.csv`` keeps its rows logged before ``keep_before_step``.

    Lightning's writer deletes an existing file; this one keeps it, dropping (atomically) only the rows of the
    interrupted part: those logged at or after the resume point.
    """

    def __init__(self, log_dir: str, keep_before_step: int) -> None:
        self._keep_before_step = keep_before_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            header = list(reader.fieldnames or [])
            rows = [row for row in reader if _step(row) < self._keep_before_step]
        with atomic_path(path) as partial, partial.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = header


def _step(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0


class ResumingCSVLogger(CSVLogger):
    """:class:`~lightning.pytorch.loggers.CSVLogger` that continues a run's ``metrics.csv`` from a resume point.

    Args:
        save_dir: Root of the run folders.
        name: Run name.
        version: The run folder's number.
        keep_before_step: Rows logged at an earlier step are kept, the rest (the interrupted part) dropped.
    """

    def __init__(self, save_dir: str | os.PathLike[str], name: str, version: int, keep_before_step: int) -> None:
        super().__init__(save_dir=str(save_dir), name=name, version=version)
        self._keep_before_step = keep_before_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        """The CSV writer, created once, continuing the existing ``metrics.csv``."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(self.log_dir, self._keep_before_step)
        return self._experiment


def run_loggers(root: str | os.PathLike[str], name: str, resume: ResumePoint | None = None) -> list[Any]:
    """A CSV and a TensorBoard logger sharing one run folder: a new one, or the resumed run's own.

    A new folder is claimed with :func:`claim_run_folder` (on global rank 0; other ranks of a multi-process run do
    not log). When ``resume`` lies in a run folder, both loggers continue it: ``metrics.csv`` keeps its rows from
    before the checkpoint, and TensorBoard purges the events logged after it.

    Example:
        >>> import tempfile
        >>> csv_logger, tensorboard = run_loggers(tempfile.mkdtemp(), "cvft")
        >>> csv_logger.version, tensorboard.version
        (0, 0)
    """
    if resume is not None and resume.version is not None:
        csv_logger: CSVLogger = ResumingCSVLogger(resume.save_dir, resume.name, resume.version, resume.global_step)
        tensorboard = TensorBoardLogger(
            save_dir=str(resume.save_dir),
            name=resume.name,
            version=resume.version,
            default_hp_metric=False,
            purge_step=resume.global_step,
        )
        return [csv_logger, tensorboard]
    version = claim_run_folder(root, name) if rank_zero_only.rank == 0 else None
    csv_logger = CSVLogger(save_dir=str(root), name=name, version=version)
    tensorboard = TensorBoardLogger(save_dir=str(root), name=name, version=csv_logger.version, default_hp_metric=False)
    return [csv_logger, tensorboard]
