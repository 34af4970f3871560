from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cvft.data.dataset import ImageDataset, seed_worker
from cvft.data.samples import Sample
from cvft.data.transforms import build_transforms
from cvft.errors import DatasetError, ImageLoadError


def test_single_label_items(save_image, tmp_path):
    path = save_image(tmp_path / "a.png", size=(12, 10))
    transform = build_transforms(8, (0.5,) * 3, (0.5,) * 3, train=False)
    dataset = ImageDataset([Sample(path, 3), (path, 1)], transform)
    image, target = dataset[0]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32
    assert target.dtype == torch.int64 and target.ndim == 0 and int(target) == 3
    assert int(dataset[1][1]) == 1 and len(dataset) == 2 and dataset.labelled and dataset.paths == [path, path]


def test_multi_label_items_are_multi_hot(save_image, tmp_path):
    path = save_image(tmp_path / "a.png")
    dataset = ImageDataset([Sample(path, (0, 2))], multi_label=True, num_classes=4)
    image, target = dataset[0]
    assert target.dtype == torch.float32 and target.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert image.shape == (3, 16, 16) and image.min() >= 0.0 and image.max() <= 1.0
    with pytest.raises(ValueError, match="num_classes"):
        ImageDataset([Sample(path, (0,))], multi_label=True)


def test_unlabelled_items_return_index(save_image, tmp_path):
    paths = [save_image(tmp_path / f"{i}.png", value=i) for i in range(3)]
    dataset = ImageDataset(paths, channels=1)
    image, index = dataset[2]
    assert image.shape == (1, 16, 16) and index.dtype == torch.int64 and int(index) == 2
    assert not dataset.labelled


def test_errors_name_the_file(tmp_path, save_image):
    bad = tmp_path / "broken.png"
    bad.write_text("nope")
    with pytest.raises(ImageLoadError, match="broken.png"):
        next(iter(DataLoader(ImageDataset([Sample(bad, 0)]), batch_size=1)))

    def failing(image):
        raise RuntimeError("boom")

    good = save_image(tmp_path / "good.png")
    with pytest.raises(DatasetError, match="good.png.*boom"):
        ImageDataset([good], failing)[0]


def test_worker_error_names_the_file_and_workers_get_distinct_augmentations(tmp_path):
    image = tmp_path / "noise.png"
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(image)
    transform = build_transforms(16, (0.5,) * 3, (0.5,) * 3, train=True, seed=0)
    loader = DataLoader(
        ImageDataset([Sample(image, 0)] * 4, transform), batch_size=2, num_workers=2, worker_init_fn=seed_worker
    )
    first, second = (batch[0] for batch in loader)  # batch i comes from worker i
    assert not torch.equal(first, second)

    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    loader = DataLoader(ImageDataset([Sample(bad, 0)]), batch_size=1, num_workers=1)
    with pytest.raises(ImageLoadError, match="bad.jpg"):
        next(iter(loader))


def test_views_are_independent_transforms_and_indices_follow_items(tmp_path):
    from PIL import Image as PILImage

    path = tmp_path / "a.png"
    PILImage.fromarray((np.arange(16 * 16 * 3) % 251).astype(np.uint8).reshape(16, 16, 3)).save(path)
    calls = []

    def transform(image):
        calls.append(image.copy())
        flipped = image[:, ::-1] if len(calls) % 2 == 0 else image  # the second view differs from the first
        return {"image": torch.from_numpy(np.ascontiguousarray(flipped)).permute(2, 0, 1).float()}

    dataset = ImageDataset([Sample(path, 1), Sample(path, 0)], transform, num_views=2, return_index=True)
    image, target, index = dataset[1]
    assert image.shape == (2, 3, 16, 16) and int(target) == 0 and int(index) == 1
    assert torch.equal(image[1], image[0].flip(-1)) and not torch.equal(image[0], image[1])
    assert len(calls) == 2 and all(np.array_equal(c, calls[0]) for c in calls)  # the file is read once
