"""Unlabelled target-domain images from a folder, preprocessed exactly like the backbone's labelled data.

Domain adaptation reads a folder of images without labels (searched recursively, as ``cvft predict`` does). They go
through :func:`cvft.data.transforms.build_transforms` with the backbone's pretrained data config (size, mean, std,
interpolation, eval crop), as :class:`~cvft.data.ImageFolderDataModule` does, so target and source images are
normalised the same way. Items are ``(image, index)`` (:class:`~cvft.data.dataset.ImageDataset` with plain paths).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from cvft.data.dataset import ImageDataset, seed_worker
from cvft.data.io import check_image
from cvft.data.samples import scan_unlabelled
from cvft.data.transforms import build_transforms, data_config_for
from cvft.errors import DatasetError, ImageLoadError

__all__ = ["target_dataset", "target_loader", "CyclingBatchSampler"]

_MAX_LISTED = 10


def target_dataset(
    root: str | Path,
    model: nn.Module,
    image_size: int | Sequence[int] | None = None,
    augment: str = "none",
    seed: int = 0,
) -> ImageDataset:
    """Every image under ``root`` as an unlabelled dataset, preprocessed with ``model``'s pretrained data config.

    Args:
        root: Folder of target-domain images (searched recursively; labels, if any folders exist, are ignored).
        model: The timm model the images are for; its data config gives mean, std, interpolation and crop.
        image_size: Input size; default: the model's pretrained input size.
        augment: Augmentation preset of :func:`~cvft.data.transforms.build_transforms` (``"none"``: the
            deterministic evaluation pipeline).
        seed: Seed of the augmentation pipeline's own random generator.

    Returns:
        An :class:`~cvft.data.dataset.ImageDataset` of ``(image, index)`` items.

    Raises:
        DatasetError: ``root`` is missing or holds no images.
        ImageLoadError: Some images cannot be read (all of them are listed).

    Example:
        >>> import tempfile, timm
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (40, 40)).save(root / "a.png")
        >>> dataset = target_dataset(root, timm.create_model("test_resnet"), image_size=32)
        >>> image, index = dataset[0]
        >>> image.shape, int(index)
        (torch.Size([3, 32, 32]), 0)
    """
    files = scan_unlabelled(root)
    errors = []
    for path in files:
        try:
            check_image(path)
        except ImageLoadError as error:
            errors.append(str(error))
    if errors:
        listed = "\n  ".join(errors[:_MAX_LISTED])
        raise ImageLoadError(
            f"{len(errors)} of {len(files)} target image(s) under {root} cannot be read:\n  {listed}\n"
            "Re-export or delete these files, then run again."
        )
    config = data_config_for(model)
    channels, height, width = config["input_size"]
    size = image_size if image_size is not None else (height if height == width else (height, width))
    transform = build_transforms(
        size,
        config["mean"],
        config["std"],
        train=augment != "none",
        preset=augment,
        interpolation=config["interpolation"],
        crop_pct=config["crop_pct"],
        seed=seed,
    )
    return ImageDataset(files, transform, channels=1 if channels == 1 else 3)


def target_loader(
    root: str | Path,
    model: nn.Module,
    image_size: int | Sequence[int] | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
) -> DataLoader:
    """A deterministic, unshuffled loader of ``(images, indices)`` over the target folder (see :func:`target_dataset`).

    Example:
        >>> import tempfile, timm
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> for i in range(3):
        ...     Image.new("RGB", (32, 32), (i, i, i)).save(root / f"{i}.png")
        >>> images, indices = next(iter(target_loader(root, timm.create_model("test_resnet"), 32, batch_size=2)))
        >>> images.shape, indices.tolist()
        (torch.Size([2, 3, 32, 32]), [0, 1])
    """
    dataset = target_dataset(root, model, image_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        worker_init_fn=seed_worker if num_workers > 0 else None,
    )


class CyclingBatchSampler(Sampler[list[int]]):
    """Endless batches of indices: each cycle is a fresh seeded permutation of ``range(size)``, cut into batches.

    Every image appears exactly once per cycle (the cycle's last batch may be smaller). The stream is a pure function
    of ``(size, batch_size, seed, rank, num_replicas)``, so it can restart at any batch: ``start`` skips the first
    ``start`` batches without loading anything (used to resume from a checkpoint).

    Under DDP (``num_replicas > 1``) the ranks share each cycle's permutation and split it as
    :class:`~torch.utils.data.distributed.DistributedSampler` does: rank ``r`` takes every ``num_replicas``-th item
    from position ``r``, after the permutation is padded with its own first items to a multiple of ``num_replicas``.
    The ranks' shards are disjoint (but for that padding), together they cover every item once per cycle, and all
    ranks have the same number of batches per cycle.

    Args:
        size: Number of items.
        batch_size: Items per batch.
        seed: Seed of the permutations (cycle ``c`` uses ``seed + c``); the same on every rank.
        start: Batches to skip.
        rank: This process's rank, in ``[0, num_replicas)``.
        num_replicas: Number of processes sharing the items (the DDP world size).

    Example:
        >>> sampler = iter(CyclingBatchSampler(5, 2, seed=0))
        >>> batches = [next(sampler) for _ in range(3)]
        >>> sorted(i for batch in batches for i in batch)
        [0, 1, 2, 3, 4]
        >>> shards = [next(iter(CyclingBatchSampler(4, 2, rank=r, num_replicas=2))) for r in (0, 1)]
        >>> sorted(shards[0] + shards[1])
        [0, 1, 2, 3]
    """

    def __init__(
        self, size: int, batch_size: int, seed: int = 0, start: int = 0, rank: int = 0, num_replicas: int = 1
    ) -> None:
        if size < 1 or batch_size < 1:
            raise DatasetError(f"CyclingBatchSampler needs size >= 1 and batch_size >= 1, got {size}, {batch_size}.")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise DatasetError(f"CyclingBatchSampler needs 0 <= rank < num_replicas, got {rank}, {num_replicas}.")
        self.size, self.batch_size, self.seed, self.start = size, batch_size, seed, start
        self.rank, self.num_replicas = rank, num_replicas

    @property
    def shard_size(self) -> int:
        """Items of one rank per cycle."""
        return -(-self.size // self.num_replicas)

    @property
    def batches_per_cycle(self) -> int:
        """Batches of one rank in one pass over the items."""
        return -(-self.shard_size // self.batch_size)

    def _shard(self, cycle: int) -> list[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + cycle)).tolist()
        padded = (order * self.num_replicas)[: self.shard_size * self.num_replicas]
        return padded[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        cycle, offset = divmod(self.start, self.batches_per_cycle)
        while True:
            shard = self._shard(cycle)
            for batch in range(offset, self.batches_per_cycle):
                yield shard[batch * self.batch_size : (batch + 1) * self.batch_size]
            cycle, offset = cycle + 1, 0
