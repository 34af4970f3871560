"""Multi-task fine-tuning on generated images: one backbone, a colour task (single-label) and a stripes task.

The ``cvft`` command trains one task (it links one data module's classes to one classifier), so multi-task runs
are written in Python, as here. See README.md next to this file for the command.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import TensorDataset

from cvft.data import MultiTaskDataModule
from cvft.tasks import MultiTaskClassifier

COLOURS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0]])


def scenes(n: int, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images with a background colour (4 classes) and fine stripes in any subset of the 3 channels."""
    generator = torch.Generator().manual_seed(seed)
    colour = torch.randint(0, len(COLOURS), (n,), generator=generator)
    stripes = (torch.rand(n, 3, generator=generator) < 0.5).float()
    images = COLOURS[colour][:, :, None, None].repeat(1, 1, size, size)
    pattern = 1.5 * (torch.arange(size) % 2 * 2 - 1).float()[:, None]
    images = images + stripes[:, :, None, None] * pattern + 0.3 * torch.randn(images.shape, generator=generator)
    return images, colour, stripes


def datasets(n: int, seed: int, size: int) -> dict[str, TensorDataset]:
    """The two tasks, each on its own images."""
    images, colour, _ = scenes(n, seed, size)
    other, _, stripes = scenes(n, seed + 1, size)
    return {"colour": TensorDataset(images, colour), "stripes": TensorDataset(other, stripes)}


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train and return the final validation metrics."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="test_resnet")
    parser.add_argument("--strategies", default="linear_probe", help="e.g. linear_probe, lora, 'none' (full)")
    parser.add_argument("--weighting", default="uncertainty", choices=["equal", "uncertainty"])
    parser.add_argument("--stripes-ratio", type=float, default=0.5, help="share of training batches from stripes")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--train-size", type=int, default=256)
    parser.add_argument("--output", default="runs/multitask")
    args = parser.parse_args(argv)

    tasks = {"colour": {"num_classes": 4}, "stripes": {"num_classes": 3, "multi_label": True}}
    model = MultiTaskClassifier(
        tasks,
        args.backbone,
        pretrained=False,
        strategies=None if args.strategies == "none" else args.strategies,
        weighting=args.weighting,
        lr=args.lr,
        warmup_epochs=0,
    )
    data = MultiTaskDataModule(
        datasets(args.train_size, 0, args.image_size),
        val=datasets(args.train_size // 4, 100, args.image_size),
        batch_size=32,
        ratios={"colour": 1.0 - args.stripes_ratio, "stripes": args.stripes_ratio},
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        default_root_dir=args.output,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    metrics = {k: round(float(v), 4) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")}
    metrics.update({f"weight/{t}": round(model.weighting.weight(t), 4) for t in tasks})
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
