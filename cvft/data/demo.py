"""Small real-image classification folders that can be written offline, for demos, tests and tutorials.

Sources (see ``datasets/README.md`` for licences):

* ``"digits"``: scikit-learn's handwritten digits (UCI, 1,797 images of 8x8 px, 10 classes ``0``-``9``),
  upscaled bilinearly to 32 px (or ``image_size``) and saved as grayscale PNG. Fast (about a second).
* ``"skimage"``: a 6-class texture / material set cut from real photographs bundled with scikit-image
  (``brick``, ``grass``, ``gravel``, ``retina``: fundus photograph, ``space``: Hubble deep field, ``tissue``:
  immunohistochemistry).
  Each image is a random square crop (15-35 % of the photo's shorter side, random flip), resized to 64 px and saved
  as grayscale PNG (so colour does not give the class away); 60 per class by default. Crops of one photo can
  overlap, so validation accuracy is optimistic: this set shows the mechanics, not generalisation.
* ``"fashion-mnist"``: Zalando's Fashion-MNIST training set (60,000 28x28 grayscale images, 10 classes) read from
  Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``, or ``$CVFT_FASHION_MNIST_DIR``).

The output is a class-folder root usable as ``ImageFolderDataModule(root=out)``. Output is deterministic given the
arguments; re-running with the same arguments on a folder it wrote returns at once.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from cvft.errors import DatasetError

__all__ = ["DEMO_SOURCES", "FASHION_MNIST_DIR", "write_demo_image_folder"]

DEMO_SOURCES: tuple[str, ...] = ("digits", "skimage", "fashion-mnist")
"""Names accepted by :func:`write_demo_image_folder`."""

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package installs the Fashion-MNIST files."""

FASHION_MNIST_CLASSES = (
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
_SKIMAGE_PHOTOS = {
    "brick": "brick",
    "grass": "grass",
    "gravel": "gravel",
    "retina": "retina",
    "space": "hubble_deep_field",
    "tissue": "immunohistochemistry",
}
_DEFAULT_SIZE = {"digits": 32, "skimage": 64, "fashion-mnist": 28}
_SKIMAGE_DEFAULT_PER_CLASS = 60
_MARKER = ".cvft-demo.json"
_README = {
    "digits": "scikit-learn `load_digits`: UCI ML hand-written digits (Alpaydin & Kaynak), CC BY 4.0.",
    "skimage": "Crops of photographs bundled with scikit-image (`skimage.data`): brick, grass, gravel "
    "(CC0Textures, CC0), retina (CC0), hubble_deep_field (NASA, public domain), immunohistochemistry (no known "
    "copyright restrictions); see each function's docstring in skimage.data.",
    "fashion-mnist": "Fashion-MNIST, Copyright 2017 Zalando SE, MIT licence (Debian package dataset-fashion-mnist).",
}


def write_demo_image_folder(
    source: str,
    out: str | Path,
    limit_per_class: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
) -> Path:
    """Write a real-image classification set as one folder of PNG files per class.

    Args:
        source: ``"digits"``, ``"skimage"`` or ``"fashion-mnist"`` (see the module docs).
        out: Output folder; must be absent, empty, or a folder this function wrote with the same arguments.
        limit_per_class: Keep at most this many images per class, chosen with ``seed`` (``None``: all; for
            ``"skimage"``, which has no fixed size, 60).
        seed: Seed for choosing images (and for the ``"skimage"`` crops).
        image_size: Side length in pixels; default 32 for digits, 64 for skimage, 28 for fashion-mnist.

    Returns:
        ``out`` as a ``Path``.

    Raises:
        DatasetError: Unknown source, ``out`` holds other files, or the Fashion-MNIST files are not installed.
        ImportError: scikit-learn (digits) or scikit-image (skimage) is not installed (``pip install cvft[demo]``).

    Example:
        >>> import tempfile
        >>> root = write_demo_image_folder("digits", Path(tempfile.mkdtemp()) / "digits", limit_per_class=3)
        >>> sorted(p.name for p in root.iterdir() if p.is_dir())[:3]
        ['0', '1', '2']
    """
    if source not in DEMO_SOURCES:
        raise DatasetError(f"Unknown demo source {source!r}; choose one of {', '.join(DEMO_SOURCES)}.")
    if limit_per_class is not None and limit_per_class < 1:
        raise DatasetError(f"limit_per_class must be at least 1, got {limit_per_class}.")
    size = image_size or _DEFAULT_SIZE[source]
    if size < 1:
        raise DatasetError(f"image_size must be positive, got {image_size}.")
    out = Path(out)
    params = {"source": source, "limit_per_class": limit_per_class, "seed": seed, "image_size": size}
    if already_written(out, params):
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if source == "digits":
        images = _digits(limit_per_class, rng, size)
    elif source == "skimage":
        images = _skimage(limit_per_class or _SKIMAGE_DEFAULT_PER_CLASS, rng, size)
    else:
        images = _fashion_mnist(limit_per_class, rng, size)
    for class_name, stem, image in images:
        folder = out / class_name
        folder.mkdir(exist_ok=True)
        image.save(folder / f"{stem}.png")
    (out / "README.md").write_text(
        f"# Demo images: {source}\n\nWritten by `cvft.data.demo.write_demo_image_folder` with {params}.\n\n"
        f"Source and licence: {_README[source]}\n",
        encoding="utf-8",
    )
    (out / _MARKER).write_text(json.dumps(params, sort_keys=True), encoding="utf-8")
    return out


def already_written(out: Path, params: dict, marker_name: str = _MARKER, what: str = "Demo") -> bool:
    """Whether ``out`` already holds a generated set written with ``params`` (its marker file says so).

    A missing or empty folder gives ``False``; a folder written with other arguments, a non-empty folder without
    the marker, or a file at ``out`` raise :class:`~cvft.errors.DatasetError`, so nothing a user wrote is
    overwritten.

    Example:
        >>> import tempfile
        >>> already_written(Path(tempfile.mkdtemp()) / "new", {"seed": 0})
        False
    """
    if not out.exists():
        return False
    if not out.is_dir():
        raise DatasetError(f"{what} output {out} is a file. Choose a folder path.")
    marker = out / marker_name
    if marker.is_file():
        try:
            if json.loads(marker.read_text(encoding="utf-8")) == params:
                return True
        except ValueError:
            pass
        raise DatasetError(
            f"{out} holds a {what.lower()} set written with other arguments ({marker.read_text(encoding='utf-8')}). "
            "Delete the folder or choose another one."
        )
    if any(out.iterdir()):
        raise DatasetError(f"{what} output {out} is not empty. Delete it or choose an empty / new folder.")
    return False


def _chosen(labels: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices to keep: per class, ``limit`` drawn with ``rng`` (all when ``None``), sorted."""
    if limit is None:
        return np.arange(len(labels))
    keep = [rng.permutation(np.flatnonzero(labels == c))[:limit] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def _digits(limit: int | None, rng: np.random.Generator, size: int) -> Iterator[tuple[str, str, Image.Image]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    for i in _chosen(digits.target, limit, rng):
        image = Image.fromarray(pixels[i], "L").resize((size, size), Image.Resampling.BILINEAR)
        yield str(digits.target[i]), f"{i:04d}", image


def _skimage(per_class: int, rng: np.random.Generator, size: int) -> Iterator[tuple[str, str, Image.Image]]:
    import skimage.data

    for class_name, function in _SKIMAGE_PHOTOS.items():
        photo = Image.fromarray(np.asarray(getattr(skimage.data, function)())).convert("L")
        width, height = photo.size
        for k in range(per_class):
            side = int(rng.uniform(0.15, 0.35) * min(width, height))
            left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
            crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            yield class_name, f"{k:04d}", crop


def _fashion_mnist(limit: int | None, rng: np.random.Generator, size: int) -> Iterator[tuple[str, str, Image.Image]]:
    folder = Path(os.environ.get("CVFT_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    images_path = folder / "train-images-idx3-ubyte.gz"
    labels_path = folder / "train-labels-idx1-ubyte.gz"
    if not images_path.is_file() or not labels_path.is_file():
        raise DatasetError(
            f"Fashion-MNIST files not found in {folder} (need {images_path.name} and {labels_path.name}). Install "
            "them with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or download them from "
            "github.com/zalandoresearch/fashion-mnist and set CVFT_FASHION_MNIST_DIR to their folder."
        )
    images = _read_idx(images_path, magic=2051)
    labels = _read_idx(labels_path, magic=2049)
    if len(images) != len(labels):
        raise DatasetError(f"{images_path} has {len(images)} images but {labels_path} {len(labels)} labels.")
    for i in _chosen(labels, limit, rng):
        image = Image.fromarray(images[i], "L")
        if size != image.width:
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        yield FASHION_MNIST_CLASSES[int(labels[i])], f"{i:05d}", image


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Read a gzipped IDX file (MNIST format): big-endian magic, dimension sizes, then ``uint8`` data."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DatasetError(f"{path} is not an IDX file of the expected kind (magic {found}, expected {magic}).")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * d : 8 + 4 * d], "big") for d in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
