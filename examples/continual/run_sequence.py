"""Fine-tune one backbone on a sequence of three tasks with each continual method and compare forgetting.

The CLI trains one task per run, so a task sequence is a script. The tasks are generated (no download): the same
32x32 images carry three independent cues (a colour, a bright horizontal band, a dark vertical band) and task A, B
and C each classify another cue, so learning a new task overwrites the features of the previous one.

    python examples/continual/run_sequence.py --output runs/continual
    python examples/continual/run_sequence.py --backbone resnet18 --weights <file> --methods finetune ewc
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader, TensorDataset

from cvft.continual import run_continual

COLOURS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0]])
METHODS = {
    "finetune": "finetune",
    "l2sp": {"name": "l2sp", "alpha": 10.0},
    "ewc": {"name": "ewc", "lam": 1000.0, "fisher_batches": 2},
    "lwf": {"name": "lwf", "lam": 10.0},
    "adapter_per_task": "adapter_per_task",
}


def cue_images(n: int, seed: int, size: int = 32) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Images with three independent 4-way cues, and the label of each cue."""
    generator = torch.Generator().manual_seed(seed)
    cues = [torch.randint(0, 4, (n,), generator=generator) for _ in range(3)]
    images = 0.6 * COLOURS[cues[0]][:, :, None, None].repeat(1, 1, size, size)
    for k in range(4):
        band = slice(k * size // 4, (k + 1) * size // 4)
        images[cues[1] == k, :, band, :] += 1.5
        images[cues[2] == k, :, :, band] -= 1.5
    return images + 0.3 * torch.randn(images.shape, generator=generator), cues


def tasks(n: int, batch_size: int, size: int) -> list[tuple[str, DataLoader, DataLoader, int]]:
    """Tasks A, B, C: the same images labelled by colour, by row band, by column band."""
    train_images, train_labels = cue_images(n, 1, size)
    val_images, val_labels = cue_images(256, 100, size)
    return [
        (
            name,
            DataLoader(TensorDataset(train_images, train_labels[i]), batch_size=batch_size, shuffle=True),
            DataLoader(TensorDataset(val_images, val_labels[i]), batch_size=256),
            4,
        )
        for i, name in enumerate("ABC")
    ]


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run every chosen method; return the average forgetting of each."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="test_resnet")
    parser.add_argument("--weights", default=None, help="local weights file or built-in source")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--output", default=None, help="folder for continual_<method>.csv")
    args = parser.parse_args(argv)
    forgetting = {}
    for name in args.methods:
        torch.manual_seed(0)
        result = run_continual(
            args.backbone,
            tasks(args.images, 32, 32),
            method=METHODS[name],
            epochs=args.epochs,
            lr=args.lr,
            weights=args.weights,
            output_dir=args.output,
        )
        forgetting[name] = result.average_forgetting
        print()
    print("average forgetting: " + ", ".join(f"{k} {v:.3f}" for k, v in forgetting.items()))
    return forgetting


if __name__ == "__main__":
    main()
