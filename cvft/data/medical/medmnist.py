"""MedMNIST ``.npz`` files: locating them, loading a split, and the task each data set poses.

MedMNIST (Yang et al., *Scientific Data* 2023, https://medmnist.com, CC BY 4.0) publishes each 2-D data set as one
``.npz`` with the keys ``train_images``, ``train_labels``, ``val_images``, ``val_labels``, ``test_images`` and
``test_labels``; images are ``uint8`` ``N x H x W`` (grayscale) or ``N x H x W x 3`` (RGB), labels ``N x L``
(``L = 1`` except ChestMNIST's 14 multi-label columns). The 28-pixel files are named ``<name>.npz``, the larger ones
``<name>_<size>.npz``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cvft.errors import DatasetError

__all__ = ["MEDMNIST_TASKS", "MedMNISTTask", "load_medmnist_npz", "medmnist_path", "medmnist_task"]

SPLITS = ("train", "val", "test")
ENV_VAR = "CVFT_MEDMNIST_DIR"


@dataclass(frozen=True)
class MedMNISTTask:
    """What a MedMNIST data set asks for.

    Attributes:
        task: ``"binary"``, ``"multi-class"``, ``"multi-label"`` or ``"ordinal-regression"`` (MedMNIST's names).
        num_classes: Output size: classes (single-label) or label columns (multi-label).

    Example:
        >>> MedMNISTTask("multi-label", 14).multi_label
        True
    """

    task: str
    num_classes: int

    @property
    def multi_label(self) -> bool:
        """Whether each label column is an independent binary target (sigmoid + BCE)."""
        return self.task == "multi-label"


MEDMNIST_TASKS: dict[str, MedMNISTTask] = {
    "pathmnist": MedMNISTTask("multi-class", 9),
    "chestmnist": MedMNISTTask("multi-label", 14),
    "dermamnist": MedMNISTTask("multi-class", 7),
    "octmnist": MedMNISTTask("multi-class", 4),
    "pneumoniamnist": MedMNISTTask("binary", 2),
    "retinamnist": MedMNISTTask("ordinal-regression", 5),
    "breastmnist": MedMNISTTask("binary", 2),
    "bloodmnist": MedMNISTTask("multi-class", 8),
    "tissuemnist": MedMNISTTask("multi-class", 8),
    "organamnist": MedMNISTTask("multi-class", 11),
    "organcmnist": MedMNISTTask("multi-class", 11),
    "organsmnist": MedMNISTTask("multi-class", 11),
}
"""The official MedMNIST v2 2-D data sets and their tasks (from ``medmnist.INFO``)."""


def medmnist_task(name: str | None = None, labels: np.ndarray | None = None) -> MedMNISTTask:
    """The task of a MedMNIST data set, from its official name or else from its labels.

    Args:
        name: Data set name (``"pneumoniamnist"``, ``"chestmnist"`` ..., a ``_<size>`` suffix is ignored).
        labels: ``N x L`` labels, used when ``name`` is not an official one: ``L > 1`` is multi-label, else
            ``max + 1`` classes (2: binary).

    Returns:
        A :class:`MedMNISTTask`.

    Raises:
        ValueError: Unknown name and no labels.

    Example:
        >>> medmnist_task("chestmnist"), medmnist_task(labels=np.array([[0], [2], [1]]))
        (MedMNISTTask(task='multi-label', num_classes=14), MedMNISTTask(task='multi-class', num_classes=3))
    """
    if name is not None:
        key = Path(str(name)).name.lower().removesuffix(".npz").split("_")[0]
        if key in MEDMNIST_TASKS:
            return MEDMNIST_TASKS[key]
    if labels is None:
        raise ValueError(f"Unknown MedMNIST name {name!r} ({sorted(MEDMNIST_TASKS)}): pass its labels instead.")
    labels = np.asarray(labels)
    labels = labels.reshape(len(labels), -1)
    if labels.shape[1] > 1:
        return MedMNISTTask("multi-label", int(labels.shape[1]))
    classes = int(labels.max()) + 1 if labels.size else 0
    return MedMNISTTask("binary" if classes <= 2 else "multi-class", max(classes, 2))


def load_medmnist_npz(path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of a MedMNIST ``.npz`` in the published layout.

    Args:
        path: The ``.npz`` file.
        split: ``"train"``, ``"val"`` or ``"test"``.

    Returns:
        ``(images, labels)``: ``uint8`` ``N x H x W`` or ``N x H x W x 3``, and ``int64`` ``N x L`` (labels saved
        as ``(N,)`` are reshaped to ``N x 1``).

    Raises:
        DatasetError: Missing or unreadable file, keys not in the published layout (the message lists the keys
            found), or inconsistent shapes.
        ValueError: Unknown ``split``.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "tiny.npz"
        >>> arrays = {f"{s}_{k}": np.zeros((2, 4, 4) if k == "images" else (2, 1), np.uint8)
        ...           for s in SPLITS for k in ("images", "labels")}
        >>> np.savez(path, **arrays)
        >>> images, labels = load_medmnist_npz(path, "val")
        >>> images.shape, labels.shape
        ((2, 4, 4), (2, 1))
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"MedMNIST file {path} does not exist. Pass the path of a local .npz (see medmnist_path).")
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = sorted(archive.files)
            wanted = (f"{split}_images", f"{split}_labels")
            if not set(wanted) <= set(keys):
                raise DatasetError(
                    f"{path} is not in MedMNIST's layout: it needs the keys {list(wanted)} but holds {keys}. "
                    "Save the arrays as train_images/train_labels/val_images/val_labels/test_images/test_labels."
                )
            images, labels = archive[wanted[0]], archive[wanted[1]]
    except DatasetError:
        raise
    except Exception as error:  # zipfile.BadZipFile, ValueError (pickled objects), OSError ...
        raise DatasetError(f"Cannot read MedMNIST file {path} ({type(error).__name__}: {error}).") from error
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
        raise DatasetError(
            f"{path}: {split}_images has shape {images.shape}; expected N x H x W or N x H x W x 3 (2-D MedMNIST; "
            "the 3-D data sets are not supported)."
        )
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2 or len(labels) != len(images):
        raise DatasetError(
            f"{path}: {split}_labels has shape {labels.shape} for {len(images)} images; expected {len(images)} x L."
        )
    if images.dtype != np.uint8:
        raise DatasetError(f"{path}: {split}_images is {images.dtype}; MedMNIST images are uint8.")
    return np.ascontiguousarray(images), labels.astype(np.int64)


def medmnist_path(name: str, root: str | Path | None = None, download: bool = False, size: int = 28) -> Path:
    """Find (or, with ``download=True``, fetch) a MedMNIST ``.npz``.

    Looked for in order: ``name`` itself when it is an existing file; ``root`` (a folder holding
    ``<name>.npz`` / ``<name>_<size>.npz``, or the file itself); the folder in ``$CVFT_MEDMNIST_DIR``; then, with
    ``download=True``, the official ``medmnist`` package downloads it into ``root`` (or ``$CVFT_MEDMNIST_DIR``, or
    ``<cvft cache>/medmnist``), which needs that package and internet access.

    Args:
        name: Official name (``"pneumoniamnist"``) or a path to a ``.npz``.
        root: Folder or ``.npz`` file.
        download: Allow the ``medmnist`` package to download the file.
        size: Image size: 28 (``<name>.npz``) or 64 / 128 / 224 (``<name>_<size>.npz``).

    Returns:
        The path of an existing ``.npz``.

    Raises:
        DatasetError: Not found (the message lists where it looked and the way out), or the download failed.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "breastmnist.npz").write_bytes(b"")
        >>> medmnist_path("breastmnist", root=folder).name
        'breastmnist.npz'
    """
    as_path = Path(name).expanduser()
    if as_path.suffix == ".npz" and as_path.is_file():
        return as_path
    key = str(name).lower()
    filename = f"{key}.npz" if size == 28 else f"{key}_{size}.npz"
    tried = []
    candidates = []
    if root is not None:
        root = Path(root).expanduser()
        candidates += [root] if root.suffix == ".npz" else [root / filename]
    if os.environ.get(ENV_VAR):
        candidates.append(Path(os.environ[ENV_VAR]).expanduser() / filename)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
        tried.append(str(candidate))
    if download:
        return _download(key, filename, root, size)
    where = ", ".join(tried) if tried else "nowhere (no root and no $" + ENV_VAR + ")"
    raise DatasetError(
        f"MedMNIST file {filename} not found; looked in: {where}. Pass root=<folder with {filename}> or the .npz "
        f"path, set ${ENV_VAR}, or use download=True with the medmnist package installed and internet access."
    )


def _download(key: str, filename: str, root: Path | None, size: int) -> Path:
    try:
        import medmnist
    except ImportError as error:
        raise DatasetError(
            f"download=True needs the official medmnist package (pip install medmnist) to fetch {filename}. "
            "Offline, download the .npz elsewhere and pass its path (or its folder as root)."
        ) from error
    if key not in medmnist.INFO:
        raise DatasetError(f"Unknown MedMNIST data set {key!r}; medmnist knows {sorted(medmnist.INFO)}.")
    if root is None or root.suffix == ".npz":
        from cvft.backbones.sources import cache_dir

        root = Path(os.environ[ENV_VAR]).expanduser() if os.environ.get(ENV_VAR) else cache_dir() / "medmnist"
    root.mkdir(parents=True, exist_ok=True)
    options = {} if size == 28 else {"size": size}
    try:
        getattr(medmnist, medmnist.INFO[key]["python_class"])(split="test", root=str(root), download=True, **options)
    except Exception as error:  # no network, server errors, md5 mismatch ...
        raise DatasetError(
            f"Downloading {filename} with medmnist failed ({type(error).__name__}: {error}). Offline, download the "
            f".npz elsewhere and pass its path (or its folder as root)."
        ) from error
    path = root / filename
    if not path.is_file():
        raise DatasetError(f"medmnist reported success but {path} is missing; pass the .npz path explicitly.")
    return path
