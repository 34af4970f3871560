r"""Label CSV files of medical images: path, label, patient id, supplied split and metadata columns.

One row per image::

    path,label,patient_id,split,age,view
    p01/chest_1.dcm,Effusion|Nodule,p01,train,63,PA
    p02/chest_1.dcm,No Finding,p02,val,41,AP

``label`` holds one class, or several separated by ``|`` with ``multi_label=True`` (the conventions of
:func:`cvft.data.samples.read_label_csv`). ``patient_id`` is what patient-level splits group by
(:mod:`cvft.data.medical.patient_split`); ``split`` (``train`` / ``val`` / ``test``) is a split chosen by the
user; every other column is kept, as text, in the record's ``metadata``.

Multi-label data often has images with no finding at all. They are written with an explicit label, not an empty
cell, so a forgotten label is never read as "healthy": pass that label as ``none_label`` (``"No Finding"`` in
ChestX-ray14) and its rows get an empty target (an all-zero multi-hot vector); it is not a class. An empty cell is
an error unless ``none_label`` is set, in which case it means the same.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from cvft.data.samples import (
    Sample,
    class_index,
    label_csv_location,
    label_indices,
    missing_files_error,
    parse_label_cell,
    resolve_csv_path,
)
from cvft.errors import DatasetError

__all__ = ["MedicalRecord", "SPLIT_NAMES", "read_medical_csv", "as_samples"]

SPLIT_NAMES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
"""Accepted ``split`` cell values (case-insensitive) and the split each one means."""


class MedicalRecord(NamedTuple):
    """One labelled medical image.

    Attributes:
        path: Image file (DICOM, NIfTI, PNG, TIFF …).
        target: Class index (single-label) or sorted tuple of class indices (multi-label; ``()`` = no finding).
        patient_id: Patient the image belongs to, or ``None`` when the CSV has no patient column.
        split: ``"train"``, ``"val"`` or ``"test"`` when the CSV supplies the split, else ``None``.
        metadata: Every other column of the row, as text (age, view, scanner …).
    """

    path: Path
    target: int | tuple[int, ...]
    patient_id: str | None = None
    split: str | None = None
    metadata: dict[str, str] = {}  # noqa: RUF012 - NamedTuple default, never mutated


def read_medical_csv(
    csv_path: str | Path,
    root: str | Path | None = None,
    multi_label: bool = False,
    class_names: Sequence[str] | None = None,
    path_column: str = "path",
    label_column: str = "label",
    patient_column: str = "patient_id",
    split_column: str = "split",
    none_label: str | None = None,
) -> tuple[list[MedicalRecord], list[str]]:
    r"""Read a medical label CSV file into records.

    Paths are relative to ``root`` (default: the CSV file's folder) unless absolute. Column names are matched
    case-insensitively; ``patient_column`` and ``split_column`` are optional.

    Args:
        csv_path: CSV file with a header row.
        root: Folder that relative paths start from; default: the CSV file's folder.
        multi_label: Rows may name several classes (``Effusion|Nodule``).
        class_names: Fix the class index order (the training CSV's classes for a validation CSV); labels not in it
            raise. ``None``: the sorted labels found (numerically when all are integers).
        path_column: Column holding the image path.
        label_column: Column holding the label(s).
        patient_column: Column holding the patient id (optional).
        split_column: Column holding ``train`` / ``val`` / ``test`` (optional; empty cells raise).
        none_label: Multi-label only: the label meaning "no finding" (e.g. ``"No Finding"``). Its rows, and rows
            with an empty label cell, get the empty target ``()``; it is not a class and cannot be combined with
            other labels.

    Returns:
        ``(records, class_names)`` in file order.

    Raises:
        DatasetError: The file is missing, lacks the path / label columns or rows, a label is empty or unknown, a
            split cell is not train / val / test, a patient cell is empty, or images are missing (listed at once).
        ValueError: ``none_label`` without ``multi_label``.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> Image.new("L", (8, 8)).save(root / "a.png")
        >>> _ = (root / "labels.csv").write_text("path,label,patient_id,age\na.png,Nodule|Effusion,p1,63\n")
        >>> records, names = read_medical_csv(root / "labels.csv", multi_label=True)
        >>> names, records[0].target, records[0].patient_id, records[0].metadata
        (['Effusion', 'Nodule'], (0, 1), 'p1', {'age': '63'})
    """
    if none_label is not None and not multi_label:
        raise ValueError(f"none_label={none_label!r} needs multi_label=True; in single-label data it is a class.")
    csv_path, base = label_csv_location(csv_path, root)
    header, rows = _read_table(csv_path, path_column, label_column)
    columns = {name.strip().lower(): i for i, name in enumerate(header)}
    path_col, label_col = columns[path_column.lower()], columns[label_column.lower()]
    patient_col, split_col = columns.get(patient_column.lower()), columns.get(split_column.lower())
    special = {path_col, label_col, patient_col, split_col}
    extra = [(name.strip(), i) for i, name in enumerate(header) if i not in special]

    parsed: list[list[str]] = []
    for line, row in rows:
        where = f"{csv_path} line {line} ({row[path_col].strip()})"
        parsed.append(_labels(row[label_col], multi_label, none_label, where))
    class_names, index = class_index(parsed, class_names)

    records: list[MedicalRecord] = []
    missing: list[str] = []
    for (line, row), names in zip(rows, parsed, strict=True):
        path_text = row[path_col].strip()
        where = f"{csv_path} line {line} ({path_text})"
        targets = label_indices(names, index, where)
        path = resolve_csv_path(path_text, base)
        if not path.is_file():
            missing.append(f"line {line}: {path}")
        records.append(
            MedicalRecord(
                path,
                targets if multi_label else targets[0],
                _patient(row, patient_col, where),
                _split(row, split_col, where),
                {name: row[i].strip() for name, i in extra},
            )
        )
    if missing:
        raise missing_files_error(missing, csv_path, base)
    return records, class_names


def as_samples(records: Sequence[MedicalRecord]) -> list[Sample]:
    """Drop patient, split and metadata: ``(path, target)`` samples for the generic cvft data tools.

    Args:
        records: Medical records.

    Returns:
        One :class:`~cvft.data.samples.Sample` per record.

    Example:
        >>> as_samples([MedicalRecord(Path("a.dcm"), 1, "p1")])
        [Sample(path=PosixPath('a.dcm'), target=1)]
    """
    return [Sample(r.path, r.target) for r in records]


def _read_table(csv_path: Path, path_column: str, label_column: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None) or []
        names = [c.strip().lower() for c in header]
        needed = [c for c in (path_column, label_column) if c.lower() not in names]
        if needed:
            raise DatasetError(
                f"{csv_path} must start with a header row naming the columns {path_column!r} and {label_column!r} "
                f"(missing {needed}), got {header}. Add them to the header line, or pass path_column= / "
                "label_column= with your column names."
            )
        duplicated = sorted({n for n in names if n and names.count(n) > 1})
        if duplicated:
            raise DatasetError(f"{csv_path} has duplicate column(s) {duplicated}. Rename or remove one of each.")
        rows: list[tuple[int, list[str]]] = []
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DatasetError(
                    f"{csv_path} line {reader.line_num} has {len(row)} column(s), the header has {len(header)}: "
                    f"{row}. Quote cells that contain commas, and give every row one cell per column."
                )
            if not row[names.index(path_column.lower())].strip():
                raise DatasetError(
                    f"{csv_path} line {reader.line_num} has an empty path. Fill it in or delete the row."
                )
            rows.append((reader.line_num, row))
    if not rows:
        raise DatasetError(f"{csv_path} has a header but no rows. Add one row per image.")
    return header, rows


def _labels(cell: str, multi_label: bool, none_label: str | None, where: str) -> list[str]:
    if not cell.strip():
        if none_label is not None:
            return []
        if multi_label:
            raise DatasetError(
                f"{where} has an empty label. Fill in its findings; if an empty cell means 'no finding', pass "
                "none_label= (e.g. none_label='No Finding')."
            )
    names = parse_label_cell(cell, multi_label, where)
    if none_label is not None and none_label in names:
        if len(names) > 1:
            raise DatasetError(
                f"{where} combines the no-finding label {none_label!r} with {[n for n in names if n != none_label]}. "
                "Keep either the findings or the no-finding label."
            )
        return []
    return names


def _patient(row: list[str], column: int | None, where: str) -> str | None:
    if column is None:
        return None
    patient = row[column].strip()
    if not patient:
        raise DatasetError(
            f"{where} has an empty patient id. Fill it in: patient-level splits need every image's patient."
        )
    return patient


def _split(row: list[str], column: int | None, where: str) -> str | None:
    if column is None:
        return None
    cell = row[column].strip().lower()
    if cell not in SPLIT_NAMES:
        raise DatasetError(
            f"{where} has split {row[column].strip()!r}; use one of train, val, test (or drop the split column to "
            "let cvft split by patient)."
        )
    return SPLIT_NAMES[cell]
