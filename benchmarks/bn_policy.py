"""BatchNorm policy (``bn: train`` / ``frozen`` / ``adabn``) of parameter strategies on a real medical task.

EfficientNet-Lite0 with real ImageNet weights is fine-tuned on BreastMNIST (ultrasound, 546 training / 156 test
images, 2 classes, 73% majority class) with cvft's Python API (``create_backbone``, ``apply_strategies``,
``build_param_groups``) in a plain loop, once per strategy, BN policy and seed. The table gives test accuracy and
AUROC (mean and per seed) and, per strategy, the ratio of each policy against the named baseline ``bn: frozen``
(cvft's behaviour before the option existed). A collapse to the majority class reads accuracy 0.731, AUROC ~0.5.

    python benchmarks/bn_policy.py                                   # lora + linear_probe, train vs frozen, 2 seeds
    python benchmarks/bn_policy.py --runs lora:train lora:adabn --seeds 0 1 2 --image-size 96 --epochs 10
    python benchmarks/bn_policy.py --data path/to/breastmnist.npz --weights path/to/tf_efficientnet_lite0.safetensors

Defaults point at the shared assets of the cvft workspace (``../shared/assets``); any MedMNIST ``.npz`` works.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cvft.backbones import create_backbone
from cvft.strategies import apply_strategies, build_param_groups

ASSETS = Path(__file__).resolve().parents[1] / ".." / "shared" / "assets"
DATA = ASSETS / "medmnist_28" / "breastmnist.npz"
WEIGHTS = ASSETS / "efficientnet_lite0_imagenet" / "tf_efficientnet_lite0.timm.safetensors"
#: strategy name -> (spec without bn, learning rate)
STRATEGIES = {
    "lora": ({"name": "lora", "rank": 8, "alpha": 16, "targets": "pointwise"}, 3e-3),
    "linear_probe": ({"name": "linear_probe"}, 1e-2),
}


def load_split(path: Path, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MedMNIST images as ``(N, 3, size, size)`` floats normalised with mean = std = 0.5 (Lite0's config)."""
    data = np.load(path)
    images = torch.from_numpy(data[f"{split}_images"]).float().div(255)
    images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    labels = torch.from_numpy(data[f"{split}_labels"]).long().view(-1)
    return (images - 0.5) / 0.5, labels


def batches(images, labels, batch_size: int, generator: torch.Generator | None = None):
    order = torch.randperm(len(images), generator=generator) if generator is not None else torch.arange(len(images))
    return [(images[i], labels[i]) for i in order.split(batch_size)]


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Binary AUROC by the rank statistic (ties count one half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).float().sum() + 0.5 * (pos[:, None] == neg[None, :]).float().sum()
    return float(greater / (len(pos) * len(neg)))


@torch.no_grad()
def evaluate(model, images, labels, batch_size: int) -> tuple[float, float]:
    model.eval()
    logits = torch.cat([model(x) for x, _ in batches(images, labels, batch_size)])
    accuracy = float((logits.argmax(1) == labels).float().mean())
    return accuracy, auroc(logits.softmax(1)[:, 1], labels)


def run(strategy: str, bn: str, seed: int, args, train, test) -> tuple[float, float, float]:
    spec, lr = STRATEGIES[strategy]
    torch.manual_seed(seed)
    model = create_backbone("tf_efficientnet_lite0", weights=args.weights, num_classes=2)
    generator = torch.Generator().manual_seed(seed)
    calibration = batches(*train, args.batch_size)  # only read for bn="adabn"
    stack = apply_strategies(model, [{**spec, "bn": bn}], calibration_data=calibration)
    optimizer = torch.optim.AdamW(build_param_groups(model, lr, 0.01, stack.lr_scales(model)))
    start = time.perf_counter()
    for epoch in range(args.epochs):
        stack.on_epoch_start(model, epoch)
        model.train()
        for images, labels in batches(*train, args.batch_size, generator):
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    accuracy, area = evaluate(model, *test, 128)
    return accuracy, area, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["lora:train", "lora:frozen", "linear_probe:train", "linear_probe:frozen"],
        help="strategy:bn pairs",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train = load_split(args.data, "train", args.image_size)
    test = load_split(args.data, "test", args.image_size)
    majority = float(torch.bincount(test[1]).max() / len(test[1]))
    print(
        f"data {args.data.name}: {len(train[1])} train / {len(test[1])} test, majority-class accuracy {majority:.3f}; "
        f"{args.image_size}px, {args.epochs} epochs, batch {args.batch_size}, seeds {args.seeds}",
        flush=True,
    )
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for pair in args.runs:
        strategy, bn = pair.split(":")
        for seed in args.seeds:
            accuracy, area, seconds = run(strategy, bn, seed, args, train, test)
            results.setdefault((strategy, bn), []).append((accuracy, area))
            print(
                f"  {strategy:13s} bn={bn:7s} seed={seed}: acc {accuracy:.3f}  AUROC {area:.3f}  ({seconds:.0f}s)",
                flush=True,
            )
    print("\n| strategy | bn | test acc (mean) | test AUROC (mean) | AUROC / frozen | per seed (acc/AUROC) |")
    print("|---|---|---|---|---|---|")
    for (strategy, bn), rows in results.items():
        acc = statistics.mean(r[0] for r in rows)
        area = statistics.mean(r[1] for r in rows)
        base = results.get((strategy, "frozen"))
        ratio = f"{area / statistics.mean(r[1] for r in base):.2f}" if base else "-"
        seeds = ", ".join(f"{a:.3f}/{u:.3f}" for a, u in rows)
        print(f"| {strategy} | {bn} | {acc:.3f} | {area:.3f} | {ratio} | {seeds} |")


if __name__ == "__main__":
    main()
