"""Whole-fit wall time of a linear probe on images against the same fit on cached backbone features.

Both fits run in one process on the same real data (the Imagenette subset from ``shared/assets``), the same
EfficientNet-Lite0 ImageNet weights, seed and settings (``augment: none``, ``linear_probe``); one uses
``feature_cache="off"``, the other ``"disk"`` with an empty cache folder, so its time includes the one pass that
computes the features. The table gives the wall-time ratio and the largest difference of any final metric.

    nice python benchmarks/feature_cache.py                                   # 10 epochs, 128 px, all images
    nice python benchmarks/feature_cache.py --train-per-class 60 --val-per-class 20   # a quick run

Targets: ratio >= 5x, max |metric difference| <= 1e-4.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from cvft.data import ImageFolderDataModule
from cvft.tasks import ImageClassifier

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"


def write_csv(root: Path, split: str, per_class: int | None, out: Path) -> Path:
    rows = []
    for folder in sorted(p for p in (root / split).iterdir() if p.is_dir()):
        files = sorted(folder.iterdir())[:per_class]
        rows += [f"{f},{folder.name}" for f in files]
    out.write_text("path,label\n" + "\n".join(rows) + "\n")
    return out


def run(args, mode: str, csvs: tuple[Path, Path]) -> tuple[float, dict[str, float]]:
    pl.seed_everything(0, workers=True)
    data = ImageFolderDataModule(
        csv=str(csvs[0]), val_csv=str(csvs[1]), backbone="tf_efficientnet_lite0", image_size=args.image_size,
        batch_size=args.batch_size, num_workers=args.workers, augment="none", check_images="none",
    )  # fmt: skip
    model = ImageClassifier(
        "tf_efficientnet_lite0", weights=str(args.weights), num_classes=data.num_classes, strategies="linear_probe",
        lr=1e-3, feature_cache=mode,
    )  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=args.epochs, logger=False, enable_checkpointing=False, deterministic=True,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    elapsed = time.perf_counter() - start
    return elapsed, {k: float(v) for k, v in trainer.callback_metrics.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ASSETS / "imagenette_224_subset")
    parser.add_argument(
        "--weights",
        type=Path,
        default=ASSETS / "efficientnet_lite0_imagenet" / "tf_efficientnet_lite0.timm.safetensors",
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--train-per-class", type=int, default=None, help="images per class (default: all)")
    parser.add_argument("--val-per-class", type=int, default=None)
    args = parser.parse_args()
    for path in (args.data, args.weights):
        if not path.exists():
            raise SystemExit(f"{path} not found; pass --data / --weights (see shared/assets/README.md).")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as folder:
        import os

        os.environ["CVFT_CACHE"] = folder  # an empty cache: the cached fit pays for computing the features
        csvs = (
            write_csv(args.data, "train", args.train_per_class, Path(folder) / "train.csv"),
            write_csv(args.data, "val", args.val_per_class, Path(folder) / "val.csv"),
        )
        images_time, images_metrics = run(args, "off", csvs)
        cached_time, cached_metrics = run(args, "disk", csvs)
    shared = sorted(set(images_metrics) & set(cached_metrics))
    worst = max(abs(images_metrics[k] - cached_metrics[k]) for k in shared)
    settings = f"{args.epochs} epochs, {args.image_size} px, augment none"
    print(f"\nlinear_probe, tf_efficientnet_lite0 (ImageNet weights), {settings}")
    print("| fit | wall s | val/acc | val/loss |\n|---|---:|---:|---:|")
    for name, seconds, values in (
        ("images (feature_cache=off)", images_time, images_metrics),
        ("cached (feature_cache=disk, cold)", cached_time, cached_metrics),
    ):
        print(f"| {name} | {seconds:.1f} | {values['val/acc']:.4f} | {values['val/loss']:.5f} |")
    print(f"\nspeed-up: {images_time / cached_time:.2f}x (target >= 5x); max |metric difference| over {len(shared)} "
          f"metrics: {worst:.2e} (target <= 1e-4)")  # fmt: skip


if __name__ == "__main__":
    main()
