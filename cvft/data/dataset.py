"""A map-style dataset of image files with class-index, multi-hot or index targets."""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from cvft.data.io import load_image
from cvft.data.samples import Sample
from cvft.errors import DatasetError, ImageLoadError

__all__ = ["ImageDataset", "ItemOptions", "seed_worker"]


class ItemOptions(TypedDict, total=False):
    """The item options of :class:`ImageDataset` (see its Args), which its subclasses pass on as ``**options``.

    Example:
        >>> options: ItemOptions = {"multi_label": True, "num_classes": 4}
        >>> sorted(ItemOptions.__optional_keys__)
        ['multi_label', 'num_classes', 'num_views', 'return_index']
    """

    multi_label: bool
    num_classes: int | None
    num_views: int
    return_index: bool


class ImageDataset(Dataset):
    """Images from files, transformed into tensors.

    Items are ``(image, target)``:

    * single-label: ``target`` is an ``int64`` scalar tensor (class index);
    * multi-label: a ``float32`` multi-hot vector of length ``num_classes``;
    * unlabelled (items given as plain paths, for prediction): the item's ``int64`` index, so predictions can be
      matched to :attr:`paths`.

    Without a transform the image is returned as a ``float32`` ``C x H x W`` tensor in 0..1.

    Args:
        samples: :class:`~cvft.data.samples.Sample` items or ``(path, target)`` tuples, or plain paths for
            unlabelled data.
        transform: Albumentations-style callable taking ``image=`` and returning ``{"image": tensor}``.
        channels: 3 (RGB) or 1 (grayscale); see :func:`~cvft.data.io.load_image`.
        multi_label: Targets are tuples of class indices, returned as multi-hot vectors.
        num_classes: Length of multi-hot vectors; required when ``multi_label``.
        num_views: Independently transformed views of each labelled image; with more than one, the image is a
            ``(V, C, H, W)`` stack (contrastive objectives ask for 2).
        return_index: Labelled items become ``(image, target, index)``, e.g. to cache a teacher's logits per sample.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> path = Path(tempfile.mkdtemp()) / "a.png"
        >>> Image.new("RGB", (5, 4)).save(path)
        >>> image, target = ImageDataset([Sample(path, 2)])[0]
        >>> image.shape, target
        (torch.Size([3, 4, 5]), tensor(2))
    """

    def __init__(
        self,
        samples: Sequence[Sample | tuple[Any, Any] | str | Path],
        transform: Callable[..., dict[str, Any]] | None = None,
        channels: int = 3,
        multi_label: bool = False,
        num_classes: int | None = None,
        num_views: int = 1,
        return_index: bool = False,
    ) -> None:
        if num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {num_views}.")
        if multi_label and not num_classes:
            raise ValueError("ImageDataset(multi_label=True) needs num_classes for the multi-hot targets.")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}.")
        self.samples: list[Sample | Path] = [_as_item(s) for s in samples]
        self.transform = transform
        self.channels = channels
        self.multi_label = multi_label
        self.num_classes = num_classes
        self.num_views = num_views
        self.return_index = return_index

    @property
    def paths(self) -> list[Path]:
        """Image files in item order."""
        return [s.path if isinstance(s, Sample) else s for s in self.samples]

    @property
    def labelled(self) -> bool:
        """Whether items carry targets (``False``: items return their index)."""
        return bool(self.samples) and isinstance(self.samples[0], Sample)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return self._item(index, self._image(index))

    def read(self, index: int) -> np.ndarray:
        """Return item ``index`` as an ``H x W x channels`` ``uint8`` array, before the transform.

        Args:
            index: Item index.

        Returns:
            The decoded image (see :func:`~cvft.data.io.load_image`).
        """
        return load_image(self._path(index), channels=self.channels)

    def _path(self, index: int) -> Path:
        sample = self.samples[index]
        return sample.path if isinstance(sample, Sample) else sample

    def _image(self, index: int) -> torch.Tensor:
        """Item ``index``'s image, read and transformed (a ``(V, C, H, W)`` stack of views when ``num_views > 1``)."""
        array, path = self.read(index), self._path(index)
        if self.num_views > 1 and isinstance(self.samples[index], Sample):
            return torch.stack([self._transformed(array, path) for _ in range(self.num_views)])
        return self._transformed(array, path)

    def _item(self, index: int, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The item of ``index`` around its transformed ``image``: with its target (and index), or its index."""
        sample = self.samples[index]
        position = torch.tensor(index, dtype=torch.int64)
        if not isinstance(sample, Sample):
            return image, position
        item = (image, self._target(sample.target))
        return (*item, position) if self.return_index else item

    def _transformed(self, array: np.ndarray, path: Path) -> torch.Tensor:
        if self.transform is None:
            return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)
        try:
            return self.transform(image=array)["image"]
        except ImageLoadError:
            raise
        except Exception as error:  # name the file in whatever the transform raised
            raise DatasetError(
                f"Transforming image {path} (shape {array.shape}) failed: {type(error).__name__}: {error}"
            ) from error

    def _target(self, target: int | tuple[int, ...]) -> torch.Tensor:
        if not self.multi_label:
            return torch.tensor(int(target), dtype=torch.int64)
        vector = torch.zeros(int(self.num_classes or 0), dtype=torch.float32)
        vector[list(target)] = 1.0
        return vector


def _as_item(item: Sample | tuple[Any, Any] | str | Path) -> Sample | Path:
    if isinstance(item, tuple):
        path, target = item
        if isinstance(target, (int, np.integer)):
            return Sample(Path(path), int(target))
        return Sample(Path(path), tuple(int(t) for t in target))
    return Path(item)


def seed_worker(worker_id: int) -> None:
    """Give each DataLoader worker its own augmentation, NumPy and ``random`` seed, and mute Pillow's warnings there.

    Albumentations pipelines keep their own random generator, which forked workers would otherwise share (all
    workers producing the same augmentations). The seed is the worker's torch seed, so runs are reproducible under
    ``lightning.seed_everything``. Pass as ``DataLoader(worker_init_fn=seed_worker)``.

    Args:
        worker_id: Worker number (unused; the seed comes from ``torch.utils.data.get_worker_info()``).

    Example:
        >>> loader = torch.utils.data.DataLoader(range(4), num_workers=0, worker_init_fn=seed_worker)
    """
    info = get_worker_info()
    if info is None:
        return
    # Pillow warns about damage it tolerates (corrupt EXIF ...); the images were checked before training, so mute
    # those here. Safe only because a worker is its own process: cvft never changes the main process's filters.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    seed = info.seed % 2**32
    np.random.seed(seed)
    random.seed(seed)
    transform = getattr(info.dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)
