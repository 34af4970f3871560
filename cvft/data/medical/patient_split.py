"""Patient-level train / val / test splits, and a check that supplied splits do not share patients.

Images of one patient are correlated (same anatomy, scanner, often the same finding), so a model evaluated on a
patient it was trained on looks better than it is. Splits here are drawn over patients, never over images:
every patient lands in exactly one split.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from cvft.data.split import stratified_split
from cvft.errors import DatasetError

__all__ = ["PatientRecord", "patient_split", "check_no_patient_leak", "patients_of"]

_MAX_PATIENTS = 10
_MAX_FILES = 3
_SPLITS = ("train", "val", "test")


class PatientRecord(Protocol):
    """What the split functions read from a record (:class:`~cvft.data.medical.labels.MedicalRecord` fits)."""

    @property
    def path(self) -> Path:
        """Image file."""
        ...

    @property
    def target(self) -> int | tuple[int, ...]:
        """Class index or tuple of class indices."""
        ...

    @property
    def patient_id(self) -> str | None:
        """Patient id (``None``: the image is its own group)."""
        ...


RecordT = TypeVar("RecordT", bound=PatientRecord)


def patients_of(records: Sequence[PatientRecord]) -> dict[str, list[int]]:
    """Group record indices by patient; a record without a patient id forms its own group.

    Args:
        records: Records with ``patient_id``.

    Returns:
        Patient id (or ``"<path>"`` for records without one) to the indices of its records, in record order.

    Example:
        >>> from cvft.data.medical.labels import MedicalRecord
        >>> patients_of([MedicalRecord(Path("a"), 0, "p1"), MedicalRecord(Path("b"), 1, "p1")])
        {'p1': [0, 1]}
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        key = record.patient_id if record.patient_id is not None else f"<{record.path}>"
        groups[key].append(i)
    return dict(groups)


def patient_split(
    records: Sequence[RecordT],
    val_fraction: float,
    test_fraction: float = 0.0,
    seed: int = 0,
    stratify: bool = True,
) -> dict[str, list[RecordT]]:
    """Split records into train / val / test by patient: each patient's images all go to one split.

    Patients are stratified by their label set: each patient counts as carrying every class any of its images
    carries, and is assigned to the stratum of its rarest class (counted over patients), as
    :func:`cvft.data.split.stratified_split` does for multi-label images. Multi-label patients with no finding form
    their own stratum. Within a stratum patients are shuffled with ``seed`` and cut by the fractions, so the
    fractions count patients, not images; the image shares follow when patients have similar numbers of images.
    The result depends only on the patients, their labels, the fractions and the seed (not on the row order).

    Args:
        records: Records with ``path``, ``target`` and ``patient_id``
            (:class:`~cvft.data.medical.labels.MedicalRecord`). A record without a patient id is its own patient.
        val_fraction: Share of patients for validation, in ``[0, 1)``.
        test_fraction: Share of patients for testing, in ``[0, 1)``; ``val_fraction + test_fraction < 1``.
        seed: Random seed.
        stratify: Stratify by label set; ``False`` shuffles all patients together.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, each in the input's record order.

    Raises:
        DatasetError: The fractions are out of range.

    Example:
        >>> from cvft.data.medical.labels import MedicalRecord
        >>> records = [MedicalRecord(Path(f"{p}_{i}.dcm"), p % 2, f"p{p}") for p in range(10) for i in range(3)]
        >>> splits = patient_split(records, val_fraction=0.2, seed=0)
        >>> {name: len(part) for name, part in splits.items()}
        {'train': 24, 'val': 6, 'test': 0}
        >>> check_no_patient_leak(splits)
    """
    groups = patients_of(records)
    patients = sorted(groups)
    if stratify:
        targets: list[int | tuple[int, ...]] = [_label_set(records, groups[p]) for p in patients]
    else:
        targets = [0] * len(patients)
    parts = stratified_split(targets, val_fraction, test_fraction, seed)
    splits: dict[str, list[RecordT]] = {}
    for name, chosen in zip(_SPLITS, parts, strict=True):
        indices = sorted(i for p in chosen for i in groups[patients[p]])
        splits[name] = [records[i] for i in indices]
    return splits


def check_no_patient_leak(splits: Mapping[str, Sequence[PatientRecord]], source: str | None = None) -> None:
    """Refuse splits that share a patient (data leakage between training and evaluation).

    Records without a patient id are not checked.

    Args:
        splits: Split name to records, e.g. a ``split`` column's train / val / test or separate CSV files.
        source: Where the splits came from, named in the error (e.g. ``"labels.csv (split column)"``).

    Raises:
        DatasetError: Some patient appears in several splits; the message lists the first leaking patients with
            a few of their files per split, and how to fix it.

    Example:
        >>> from cvft.data.medical.labels import MedicalRecord
        >>> splits = {"train": [MedicalRecord(Path("a"), 0, "p1")], "val": [MedicalRecord(Path("b"), 0, "p1")]}
        >>> check_no_patient_leak(splits)
        Traceback (most recent call last):
        ...
        cvft.errors.DatasetError: 1 patient(s) appear in more than one split...
    """
    where: dict[str, dict[str, list[Path]]] = defaultdict(dict)
    for name, records in splits.items():
        for record in records:
            if record.patient_id is not None:
                where[record.patient_id].setdefault(name, []).append(record.path)
    leaking = sorted(p for p, found in where.items() if len(found) > 1)
    if not leaking:
        return
    lines = []
    for patient in leaking[:_MAX_PATIENTS]:
        parts = []
        for name, paths in where[patient].items():
            shown = ", ".join(str(p) for p in paths[:_MAX_FILES]) + (", …" if len(paths) > _MAX_FILES else "")
            parts.append(f"{name} ({len(paths)}: {shown})")
        lines.append(f"patient {patient!r}: " + "; ".join(parts))
    more = f"\n  … and {len(leaking) - _MAX_PATIENTS} more" if len(leaking) > _MAX_PATIENTS else ""
    origin = f" in {source}" if source else ""
    raise DatasetError(
        f"{len(leaking)} patient(s) appear in more than one split{origin}, so evaluation would score images of "
        f"patients the model trained on (data leakage):\n  " + "\n  ".join(lines) + more + "\n"
        "Put every image of a patient in one split (fix the split column or the val/test CSV files), or drop the "
        "supplied split and let cvft split by patient (val_fraction / test_fraction)."
    )


def _label_set(records: Sequence[PatientRecord], indices: list[int]) -> int | tuple[int, ...]:
    labels: set[int] = set()
    multi = False
    for i in indices:
        target = records[i].target
        if isinstance(target, int):
            labels.add(target)
        else:
            multi = True
            labels.update(target)
    if not multi and len(labels) == 1:
        return next(iter(labels))
    return tuple(sorted(labels))
