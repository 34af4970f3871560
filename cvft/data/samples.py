"""Finding labelled and unlabelled samples: class folders, label CSV files and train/val/test folder layouts.

A :class:`Sample` pairs an image path with its target: a class index (single-label) or a sorted tuple of class
indices (multi-label). Every problem with the data raises :class:`~cvft.errors.DatasetError` naming the file or
folder at fault and saying how to fix it.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from cvft.data.io import is_image_file
from cvft.errors import DatasetError

__all__ = [
    "Sample",
    "SplitRoots",
    "scan_class_folders",
    "read_label_csv",
    "scan_unlabelled",
    "find_split_roots",
    "scan_split_folders",
    "is_ignored_file",
]

_logger = logging.getLogger(__name__)

_SPLIT_NAMES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
_IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini", "icon\r"})
_IGNORED_PREFIXES = ("readme", "license", "licence", "copying", "notice")
_MAX_LISTED = 20
_SUFFIX_HINT = ".jpg, .png, .bmp, .tif, .webp …"


class Sample(NamedTuple):
    """One labelled image.

    Attributes:
        path: Image file.
        target: Class index (single-label) or sorted tuple of class indices (multi-label).
    """

    path: Path
    target: int | tuple[int, ...]


class SplitRoots(NamedTuple):
    """Class-folder roots of a ``root/train``, ``root/val``, ``root/test`` layout.

    Attributes:
        train: ``root/train``.
        val: ``root/val`` (or ``valid`` / ``validation``), ``None`` when absent.
        test: ``root/test``, ``None`` when absent.
    """

    train: Path
    val: Path | None
    test: Path | None


def is_ignored_file(path: str | Path) -> bool:
    """Return whether a non-image file is clearly not data and is skipped silently when scanning.

    Hidden files (``.DS_Store``, ``._cat.jpg``), ``Thumbs.db``, ``desktop.ini`` and ``README*`` / ``LICENSE*``
    files are ignored; any other non-image file inside a class folder is an error.

    Args:
        path: File path.

    Returns:
        ``True`` when the file should be skipped.

    Example:
        >>> is_ignored_file(".DS_Store"), is_ignored_file("README.md"), is_ignored_file("notes.docx")
        (True, True, False)
    """
    name = Path(path).name.lower()
    return name.startswith(".") or name in _IGNORED_NAMES or name.startswith(_IGNORED_PREFIXES)


def scan_class_folders(root: str | Path, class_names: Sequence[str] | None = None) -> tuple[list[Sample], list[str]]:
    """Find images laid out as one sub-folder per class (``root/cat/1.jpg``, ``root/dog/a/2.png``).

    Class folders are searched recursively; hidden files and folders are skipped.

    Args:
        root: Folder holding one sub-folder per class.
        class_names: Fix the class index order (e.g. a validation split uses the training split's classes). A
            folder that is not one of these classes raises :class:`DatasetError`; classes without a folder are
            allowed. ``None`` uses the sorted folder names.

    Returns:
        ``(samples, class_names)``, samples sorted by class then path.

    Raises:
        DatasetError: ``root`` is missing or has no class folders, a class folder is empty, a class folder holds a
            file that is not an image, an image lies directly in ``root``, or a folder is not in ``class_names``.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> for name in ("cat", "dog"):
        ...     (root / name).mkdir()
        ...     Image.new("RGB", (8, 8)).save(root / name / "0.png")
        >>> samples, names = scan_class_folders(root)
        >>> names, [s.target for s in samples]
        (['cat', 'dog'], [0, 1])
    """
    root = _existing_dir(root, "Image root")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(p for p in root.iterdir() if p.is_file() and is_image_file(p) and not is_ignored_file(p))
    if not folders:
        hint = (
            f" It holds {len(loose)} images directly, e.g. {loose[0].name}: move them into one sub-folder per class."
            if loose
            else " Put the images in one sub-folder per class (root/cat/1.jpg, root/dog/2.jpg)."
        )
        raise DatasetError(f"Image root {root} has no class folders.{hint}")
    if loose:
        raise DatasetError(
            f"Image {loose[0]} lies directly in {root}, outside any class folder ({len(loose)} such files). "
            "Move it into the folder of its class, or delete it."
        )
    names = [p.name for p in folders]
    if class_names is None:
        class_names = names
    index = {name: i for i, name in enumerate(class_names)}
    unknown = [name for name in names if name not in index]
    if unknown:
        raise DatasetError(
            f"Class folder(s) {unknown} in {root} are not among the training classes {list(class_names)}. "
            "Add the class to the training split, or remove the folder."
        )
    samples: list[Sample] = []
    for folder in folders:
        files = _images_in(folder)
        if not files:
            raise DatasetError(
                f"Class folder {folder} holds no images. Add images of class {folder.name!r} or remove the folder."
            )
        samples.extend(Sample(path, index[folder.name]) for path in files)
    return samples, list(class_names)


def read_label_csv(
    csv_path: str | Path,
    root: str | Path | None = None,
    multi_label: bool = False,
    class_names: Sequence[str] | None = None,
) -> tuple[list[Sample], list[str]]:
    r"""Read a ``path,label`` CSV file.

    Paths are relative to ``root`` (default: the CSV file's folder) unless absolute. Multi-label rows separate
    classes with ``|`` (``street|car|person``). Extra columns are ignored.

    Args:
        csv_path: CSV file with a header row containing ``path`` and ``label``.
        root: Folder that relative paths start from; default: the CSV file's folder.
        multi_label: Rows may name several classes.
        class_names: Fix the class index order (e.g. the training CSV's classes for a validation CSV); labels not
            in it raise. ``None`` uses the sorted labels found (numerically when all labels are integers).

    Returns:
        ``(samples, class_names)`` in file order.

    Raises:
        DatasetError: The file is missing, has no ``path``/``label`` columns or no rows, a row's label is empty or
            unknown, a single-label row names several classes, or images are missing (all listed at once).

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (8, 8)).save(root / "a.png")
        >>> _ = (root / "labels.csv").write_text("path,label\na.png,cat|dog\n")
        >>> samples, names = read_label_csv(root / "labels.csv", multi_label=True)
        >>> names, samples[0].target
        (['cat', 'dog'], (0, 1))
    """
    csv_path, base = label_csv_location(csv_path, root)
    rows = _read_rows(csv_path)
    labels: list[list[str]] = []
    for line, path_text, label_text in rows:
        labels.append(parse_label_cell(label_text, multi_label, f"{csv_path} line {line} ({path_text})"))
    class_names, index = class_index(labels, class_names)
    samples: list[Sample] = []
    missing: list[str] = []
    for (line, path_text, _), names in zip(rows, labels, strict=True):
        targets = label_indices(names, index, f"{csv_path} line {line} ({path_text})")
        path = resolve_csv_path(path_text, base)
        if not path.is_file():
            missing.append(f"line {line}: {path}")
        samples.append(Sample(path, targets if multi_label else targets[0]))
    if missing:
        raise missing_files_error(missing, csv_path, base)
    return samples, class_names


def scan_unlabelled(folder: str | Path) -> list[Path]:
    """Find the images to predict on: a single image file, or every image under a folder (recursively).

    Hidden files and non-image files are skipped (non-image files are logged at WARNING).

    Args:
        folder: Folder or image file.

    Returns:
        Sorted image paths.

    Raises:
        DatasetError: ``folder`` does not exist or holds no images.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> folder = Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (8, 8)).save(folder / "x.png")
        >>> [p.name for p in scan_unlabelled(folder)]
        ['x.png']
    """
    folder = Path(folder)
    if folder.is_file():
        if not is_image_file(folder):
            raise DatasetError(f"{folder} is not an image file (suffix {folder.suffix!r}). Pass an image or a folder.")
        return [folder]
    folder = _existing_dir(folder, "Prediction folder")
    files: list[Path] = []
    skipped: list[Path] = []
    for path in _walk(folder):
        if is_image_file(path):
            files.append(path)
        elif not is_ignored_file(path):
            skipped.append(path)
    if skipped:
        _logger.warning("Skipping %d non-image file(s) in %s, e.g. %s", len(skipped), folder, skipped[0])
    if not files:
        raise DatasetError(f"Prediction folder {folder} holds no images ({_SUFFIX_HINT}).")
    return files


def find_split_roots(root: str | Path) -> SplitRoots | None:
    """Detect a ``root/train`` + optional ``root/val`` (``valid``, ``validation``) + ``root/test`` layout.

    Args:
        root: Dataset folder.

    Returns:
        The split folders, or ``None`` when ``root`` has no ``train`` folder (then it is a plain class-folder root).

    Raises:
        DatasetError: Several validation folders exist (``val`` and ``valid``).

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "train").mkdir(); (root / "valid").mkdir()
        >>> find_split_roots(root).val.name
        'valid'
    """
    root = Path(root)
    if not root.is_dir():
        return None
    folders = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    found: dict[str, Path | None] = {}
    for split, aliases in _SPLIT_NAMES.items():
        matches = [folders[a] for a in aliases if a in folders]
        if len(matches) > 1:
            raise DatasetError(
                f"{root} has several {split} folders {[m.name for m in matches]}. Keep one and merge the others."
            )
        found[split] = matches[0] if matches else None
    train = found["train"]
    if train is None:
        return None
    return SplitRoots(train, found["val"], found["test"])


def scan_split_folders(
    root: str | Path, class_names: Sequence[str] | None = None
) -> tuple[dict[str, list[Sample]], list[str]]:
    """Scan a ``root/train``, ``root/val``, ``root/test`` layout of class folders.

    The class list comes from ``train``; ``val`` and ``test`` may lack classes (logged at WARNING) but may not add
    any.

    Args:
        root: Folder holding ``train`` and optionally ``val`` (``valid``/``validation``) and ``test``.
        class_names: Fix the class index order (see :func:`scan_class_folders`); ``None``: sorted ``train`` folders.

    Returns:
        ``({"train": [...], "val": [...], "test": [...]}, class_names)`` with only the splits present.

    Raises:
        DatasetError: ``root`` has no ``train`` folder, a split is unusable (see :func:`scan_class_folders`) or
            a validation / test class does not exist in ``train``.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> for split in ("train", "val"):
        ...     (root / split / "cat").mkdir(parents=True)
        ...     Image.new("RGB", (8, 8)).save(root / split / "cat" / "0.png")
        >>> splits, names = scan_split_folders(root)
        >>> sorted(splits), names
        (['train', 'val'], ['cat'])
    """
    roots = find_split_roots(root)
    if roots is None:
        raise DatasetError(f"{root} has no 'train' folder. Expected root/train, root/val and optionally root/test.")
    train, class_names = scan_class_folders(roots.train, class_names)
    splits = {"train": train}
    for split, folder in (("val", roots.val), ("test", roots.test)):
        if folder is None:
            continue
        try:
            splits[split], _ = scan_class_folders(folder, class_names)
        except DatasetError as error:
            raise DatasetError(f"{split} split: {error}") from error
        absent = sorted(set(class_names) - {p.name for p in folder.iterdir() if p.is_dir()})
        if absent:
            _logger.warning("%s split %s has no folder for class(es) %s", split, folder, absent)
    return splits, class_names


def _existing_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{what} {path} does not exist. Check the path.")
    if not path.is_dir():
        raise DatasetError(f"{what} {path} is not a folder. Point to the folder that holds the images.")
    return path


def _walk(folder: Path) -> Iterable[Path]:
    """Yield the files under ``folder`` in sorted order, skipping hidden files and folders."""
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from _walk(entry)
        elif entry.is_file():
            yield entry


def _images_in(folder: Path) -> list[Path]:
    files: list[Path] = []
    for path in _walk(folder):
        if is_image_file(path):
            files.append(path)
        elif not is_ignored_file(path):
            raise DatasetError(
                f"File {path} in class folder {folder} is not an image (suffix {path.suffix!r}; images are "
                f"{_SUFFIX_HINT}). Move it out of the data folder or delete it."
            )
    return files


def _read_rows(csv_path: Path) -> list[tuple[int, str, str]]:
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        columns = [c.strip().lower() for c in header] if header else []
        if "path" not in columns or "label" not in columns:
            raise DatasetError(
                f"{csv_path} must start with a header row naming the columns 'path' and 'label', got {header}. "
                "Add the header line 'path,label'."
            )
        path_col, label_col = columns.index("path"), columns.index("label")
        rows: list[tuple[int, str, str]] = []
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            line = reader.line_num
            if len(row) <= max(path_col, label_col):
                raise DatasetError(
                    f"{csv_path} line {line} has {len(row)} column(s), expected at least {len(columns)}: {row}."
                )
            path_text = row[path_col].strip()
            if not path_text:
                raise DatasetError(f"{csv_path} line {line} has an empty path. Fill it in or delete the row.")
            rows.append((line, path_text, row[label_col]))
    if not rows:
        raise DatasetError(f"{csv_path} has a header but no rows. Add one 'path,label' row per image.")
    return rows


# --- label-CSV pieces shared with cvft.data.medical.labels ------------------------------------------------------


def label_csv_location(csv_path: str | Path, root: str | Path | None) -> tuple[Path, Path]:
    """Return a label CSV file, checked to exist, and the folder its relative paths start from.

    Args:
        csv_path: The CSV file.
        root: Folder that relative paths start from; ``None``: the CSV file's folder.

    Raises:
        DatasetError: The CSV file does not exist.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetError(f"Label CSV file {csv_path} does not exist. Check the path (e.g. --data.csv).")
    return csv_path, Path(root) if root is not None else csv_path.parent


def class_index(labels: Iterable[Sequence[str]], class_names: Sequence[str] | None) -> tuple[list[str], dict[str, int]]:
    """Return the class names in index order and each name's index.

    Args:
        labels: Every row's class names.
        class_names: The order to use; ``None``: the labels found, sorted by :func:`sorted_labels`.
    """
    names = list(class_names) if class_names is not None else sorted_labels({n for row in labels for n in row})
    return names, {name: i for i, name in enumerate(names)}


def parse_label_cell(label_text: str, multi_label: bool, where: str) -> list[str]:
    """Split one CSV label cell into its sorted, de-duplicated class names (``a|b`` when ``multi_label``).

    Raises:
        DatasetError: The cell (or one of its ``|`` parts) is empty, or a single-label cell names several classes.
    """
    names = [part.strip() for part in label_text.split("|")] if multi_label else [label_text.strip()]
    if not label_text.strip() or any(not name for name in names):
        raise DatasetError(f"{where} has an empty label. Fill in its class or delete the row.")
    if not multi_label and "|" in label_text:
        raise DatasetError(
            f"{where} has several classes {label_text!r}. Use multi_label=True for multi-label data, or give each "
            "image one class."
        )
    return sorted(set(names))


def label_indices(names: Sequence[str], index: dict[str, int], where: str) -> tuple[int, ...]:
    """Map class names to their sorted indices; a name not in ``index`` raises :class:`DatasetError`."""
    unknown = [name for name in names if name not in index]
    if unknown:
        raise DatasetError(
            f"{where} has label(s) {unknown} that are not among the training classes {list(index)}. Fix the label, "
            "or add the class to the training data."
        )
    return tuple(sorted(index[name] for name in names))


def resolve_csv_path(path_text: str, base: Path) -> Path:
    """Return a CSV cell's path: absolute as given, else relative to ``base``."""
    path = Path(path_text)
    return path if path.is_absolute() else base / path


def missing_files_error(missing: Sequence[str], csv_path: Path, base: Path) -> DatasetError:
    """The error listing every missing image of a CSV file (``"line N: path"`` entries, the first 20 shown)."""
    listed = "\n  ".join(missing[:_MAX_LISTED]) + ("\n  …" if len(missing) > _MAX_LISTED else "")
    return DatasetError(
        f"{len(missing)} image(s) named in {csv_path} do not exist (paths are relative to {base}):\n  {listed}\n"
        "Fix the paths, pass root= for the folder they are relative to, or delete those rows."
    )


def sorted_labels(labels: set[str]) -> list[str]:
    """Sort class names: numerically when all are integers, else alphabetically."""
    if labels and all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)
