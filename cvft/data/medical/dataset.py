"""Map-style datasets of medical images: files read by ``read_medical_image``, or in-memory arrays (MedMNIST).

Both return items exactly like :class:`cvft.data.dataset.ImageDataset` (``(image, target)``, ``(image, target,
index)`` with ``return_index``, ``(V, C, H, W)`` stacks with ``num_views > 1``, ``(image, index)`` for unlabelled
files), so :class:`~cvft.tasks.ImageClassifier` and every strategy train on them unchanged. The difference is the
pixel path: images stay ``float32`` in ``[0, 1]`` (no 8-bit rounding of 12/16-bit data), the channels are fitted to
the model (grayscale repeated to 3 channels for an RGB-pretrained backbone, or kept as 1 channel for
``in_chans=1``), and the transform is a float pipeline such as
:func:`~cvft.data.medical.augment.build_medical_transforms`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cvft.data.dataset import ImageDataset, ItemOptions
from cvft.errors import DatasetError

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["MedicalImageDataset", "MedicalArrayDataset", "fit_channels"]


def fit_channels(image: np.ndarray, channels: int, source: str | Path = "image") -> np.ndarray:
    """Fit an ``H x W x C`` image to the model's input channels.

    ``C == channels`` is kept; one channel is repeated to ``channels`` (grayscale into an RGB-pretrained
    backbone); three channels (an RGB file) become one by averaging when ``channels == 1``.

    Args:
        image: ``H x W x C`` array (``H x W`` is taken as one channel).
        channels: Channels the model takes (its ``in_chans``).
        source: File or item named in the error.

    Returns:
        ``H x W x channels`` array of the same dtype.

    Raises:
        DatasetError: Any other channel combination (e.g. a 5-slice 2.5D stack into a 3-channel model).

    Example:
        >>> fit_channels(np.zeros((4, 5, 1), np.float32), 3).shape
        (4, 5, 3)
    """
    if image.ndim == 2:
        image = image[:, :, None]
    have = image.shape[2]
    if have == channels:
        return image
    if have == 1:
        return np.repeat(image, channels, axis=2)
    if have == 3 and channels == 1:
        return image.mean(axis=2, keepdims=True, dtype=np.float32).astype(image.dtype)
    raise DatasetError(
        f"{source} has {have} channels but the model takes {channels}. Set channels (and the model's in_chans) to "
        f"{have}, or change the reader options (context=k gives 2k+1 slices; frame= picks one frame)."
    )


class MedicalImageDataset(ImageDataset):
    """Medical image files (DICOM, NIfTI, 16-bit PNG, TIFF …), read as float ``[0, 1]`` and transformed to tensors.

    Each image is read with :func:`cvft.data.medical.read_medical_image` (``reader_options`` are passed through:
    ``window``, ``slice_index``, ``axis``, ``context``, ``frame``), fitted to ``channels`` by
    :func:`fit_channels`, then transformed. Without a transform the image becomes a ``float32`` ``C x H x W``
    tensor in ``[0, 1]``. Targets are as in :class:`~cvft.data.dataset.ImageDataset`: an ``int64`` class index,
    or a ``float32`` multi-hot vector (all zeros for a multi-label "no finding" image).

    Args:
        records: :class:`~cvft.data.medical.labels.MedicalRecord` or :class:`~cvft.data.samples.Sample` items
            (anything with ``path`` and ``target``), ``(path, target)`` tuples, or plain paths for unlabelled data.
        transform: Albumentations-style callable on float ``H x W x C`` arrays, e.g.
            :func:`~cvft.data.medical.augment.build_medical_transforms`.
        channels: Channels the model takes (``in_chans``): 3 for RGB-pretrained backbones (grayscale is repeated),
            1 for ``in_chans=1``, or ``2k + 1`` for a 2.5D stack read with ``context=k``.
        reader_options: Keyword arguments of ``read_medical_image``.
        **options: :class:`~cvft.data.dataset.ItemOptions` (``multi_label``, ``num_classes``, ``num_views``,
            ``return_index``), as documented by :class:`~cvft.data.dataset.ImageDataset`.

    Example:
        >>> import tempfile
        >>> from pydicom.data import get_testdata_file
        >>> from cvft.data.medical.labels import MedicalRecord
        >>> dataset = MedicalImageDataset([MedicalRecord(Path(get_testdata_file("CT_small.dcm")), 1, "p1")],
        ...                               reader_options={"window": "mediastinum"})
        >>> image, target = dataset[0]
        >>> image.shape, image.dtype, target
        (torch.Size([3, 128, 128]), torch.float32, tensor(1))
    """

    def __init__(
        self,
        records: Sequence[Any],
        transform: Callable[..., dict[str, Any]] | None = None,
        channels: int = 3,
        *,
        reader_options: Mapping[str, Any] | None = None,
        **options: Unpack[ItemOptions],
    ) -> None:
        if channels < 1:
            raise ValueError(f"channels must be at least 1, got {channels}.")
        items = [_as_item(record) for record in records]
        super().__init__(items, transform, 1 if channels == 1 else 3, **options)
        self.channels = channels  # ImageDataset allows 1 or 3; medical stacks may have 2k + 1
        self.reader_options: dict[str, Any] = dict(reader_options or {})

    def read(self, index: int) -> np.ndarray:
        """Return item ``index`` as a float ``H x W x channels`` array in ``[0, 1]``, before the transform.

        Args:
            index: Item index.

        Returns:
            The read and channel-fitted image.
        """
        from cvft.data.medical.read import read_medical_image

        path = self._path(index)
        return fit_channels(read_medical_image(path, **self.reader_options), self.channels, path)

    def _transformed(self, array: np.ndarray, path: Path) -> torch.Tensor:
        if self.transform is None:
            return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(2, 0, 1)
        return super()._transformed(array, path)


TRANSFORMED_CACHE_BYTES = 1 << 30
"""Largest split (all its transformed images together) a :class:`MedicalArrayDataset` keeps in memory."""


class MedicalArrayDataset(MedicalImageDataset):
    """Medical images held in memory (MedMNIST ``.npz`` arrays), with the items of :class:`MedicalImageDataset`.

    ``uint8`` arrays are scaled to ``[0, 1]`` by 255, ``uint16`` by 65535; float arrays must already be in
    ``[0, 1]``. :attr:`paths` are identifiers ``name[i]`` (no files exist).

    Args:
        images: ``N x H x W`` (grayscale) or ``N x H x W x C`` array.
        targets: Per-image class index, or tuple of class indices with ``multi_label``.
        transform: Albumentations-style callable on float ``H x W x C`` arrays.
        channels: Channels the model takes (grayscale is repeated to 3 for RGB-pretrained backbones).
        name: Name used in :attr:`paths` and error messages (e.g. ``"pneumoniamnist.npz:train"``).
        deterministic_transform: The transform maps an image to the same tensor every time (evaluation transforms,
            training without augmentation). Each transformed image is then kept after its first use and served from
            memory in later epochs, as long as the whole split fits in :data:`TRANSFORMED_CACHE_BYTES`; items are
            identical either way.
        **options: :class:`~cvft.data.dataset.ItemOptions`, as in :class:`MedicalImageDataset`.

    Example:
        >>> images = np.zeros((4, 28, 28), np.uint8)
        >>> image, target = MedicalArrayDataset(images, [0, 1, 0, 1], channels=1)[1]
        >>> image.shape, target
        (torch.Size([1, 28, 28]), tensor(1))
    """

    in_memory = True
    """Items are cheap to load: DataModules with automatic ``num_workers`` load them in the training process."""

    def __init__(
        self,
        images: np.ndarray,
        targets: Sequence[int | Sequence[int]],
        transform: Callable[..., dict[str, Any]] | None = None,
        channels: int = 3,
        *,
        name: str = "array",
        deterministic_transform: bool = False,
        **options: Unpack[ItemOptions],
    ) -> None:
        if images.ndim not in (3, 4):
            raise DatasetError(f"{name}: images must be N x H x W or N x H x W x C, got shape {images.shape}.")
        if len(images) != len(targets):
            raise DatasetError(f"{name}: {len(images)} images but {len(targets)} targets; give one target each.")
        records = [(Path(f"{name}[{i}]"), target) for i, target in enumerate(targets)]
        super().__init__(records, transform, channels, **options)
        self.images = images
        self.name = name
        self.deterministic_transform = deterministic_transform
        self._transformed_cache: dict[int, torch.Tensor] = {}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        if not self._caches_transformed():
            return super().__getitem__(index)
        index = range(len(self))[index]  # negative indices share the positive one's entry
        image = self._transformed_cache.get(index)
        if image is None:
            image = self._image(index)  # one view: _caches_transformed asks for num_views == 1
            if image.numel() * image.element_size() * len(self) <= TRANSFORMED_CACHE_BYTES:
                self._transformed_cache[index] = image
        return self._item(index, image.clone())

    def _caches_transformed(self) -> bool:
        """Whether items come from (and go into) the cache of transformed images: deterministic, single view."""
        return self.deterministic_transform and self.num_views == 1

    def read(self, index: int) -> np.ndarray:
        """Return image ``index`` as a float ``H x W x channels`` array in ``[0, 1]``, before the transform.

        Args:
            index: Item index.

        Returns:
            The scaled and channel-fitted image.
        """
        image = self.images[index]
        if image.dtype == np.uint8:
            array = image.astype(np.float32) / 255.0
        elif image.dtype == np.uint16:
            array = image.astype(np.float32) / 65535.0
        else:
            array = image.astype(np.float32)
        return fit_channels(array, self.channels, self._path(index))


def _as_item(record: Any) -> Any:
    if hasattr(record, "path") and hasattr(record, "target"):
        target = record.target
        return (record.path, target if isinstance(target, (int, np.integer)) else tuple(target))
    return record
