r"""Cost of one detection training step per backbone strategy, side by side in one process.

The same ``ObjectDetector`` (FCOS on ``tf_efficientnet_lite0`` from its real ImageNet weights, FPN and head always
training) is built once per strategy, and rounds alternate the strategies on the same batches, so a busy machine
slows them alike. Reported per strategy: the median seconds of a training step (forward, backward, AdamW step),
images/s and its ratio to full fine-tuning (target for the PEFT rows: >= 1.0), the bytes autograd saves for backward
in one step (activation memory; deterministic on CPU; target <= full) and the trainable parameters.

``lora (branch)`` is LoRA computed as ``base(x) + B(A(x))`` in every layer, the form PEFT uses and cvft used
before; ``lora`` lets each layer choose (:meth:`~cvft.strategies.lowrank.LowRankLayer.prefers_fused`: the updated
weight ``conv(x, W + scaling * B @ A)`` on large feature maps, the branch on small ones).

Batches are real COCO128 photos when ``../shared/assets`` is present (random images otherwise), letterboxed to
``--image-size``. The end-to-end numbers (``cvft``'s training loop, data loading and validation included) are in
``benchmarks/detection.py``.

    python benchmarks/detection_speed.py                    # 320 px, batch 8, 6 rounds
    python benchmarks/detection_speed.py --image-size 256 --rounds 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial
from typing import Any

import torch
from detection import COCO128, strategies_for
from lowrank import saved_activation_bytes
from real_tasks import lite0_weights

ROWS = ("full", "frozen", "lora", "lora (branch)", "conv_adapter")


def build(row: str, image_size: int, num_classes: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The detector of one row, in training mode with BatchNorm statistics fixed, and its AdamW."""
    from cvft.strategies.lowrank import LowRankLayer
    from cvft.tasks.detection import ObjectDetector

    torch.manual_seed(0)
    strategy = "lora" if row == "lora (branch)" else row
    model = ObjectDetector(
        num_classes,
        backbone="tf_efficientnet_lite0",
        pretrained=False,
        weights=lite0_weights(),
        head="fcos",
        strategies=strategies_for(strategy, "tf_efficientnet_lite0"),
        image_size=image_size,
        fpn_channels=128,
    ).train()
    model._freeze_bn_stats()
    if row == "lora (branch)":
        for layer in model.modules():
            if isinstance(layer, LowRankLayer):
                layer.fuse_conv_update = False
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def batches(image_size: int, batch_size: int, count: int) -> tuple[list[Any], int]:
    """``count`` training batches of COCO128 photos (or random images with two boxes) and the number of classes."""
    if COCO128.is_file():
        from cvft.data.detection import DetectionDataModule

        data = DetectionDataModule(data_yaml=COCO128, image_size=image_size, batch_size=batch_size, num_workers=0)
        data.setup("fit")
        loader = iter(data.train_dataloader())
        return [next(loader) for _ in range(count)], data.num_classes
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, image_size, image_size, generator=generator) for _ in range(batch_size)]
    boxes = torch.tensor([[10.0, 20.0, 120.0, 200.0], [50.0, 60.0, 90.0, 150.0]])
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 5])} for _ in range(batch_size)]
    return [(images, targets)] * count, 80


def detection_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """The summed torchvision losses of one batch."""
    images, targets = list(batch[0]), model._targets(batch[1])
    return sum(model(images, targets).values())


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Any) -> float:
    """Seconds of one training step."""
    start = time.perf_counter()
    loss = detection_loss(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6, help="steps per strategy; the first is warm-up")
    parser.add_argument("--only", default=None, help=f"comma-separated rows of {list(ROWS)}")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    rows = [r.strip() for r in args.only.split(",")] if args.only else list(ROWS)
    data, num_classes = batches(args.image_size, args.batch_size, args.rounds)
    models = {row: build(row, args.image_size, num_classes) for row in rows}
    memory = {row: saved_activation_bytes(m, partial(detection_loss, m, data[0])) for row, (m, _) in models.items()}
    seconds: dict[str, list[float]] = {row: [] for row in rows}
    for index, batch in enumerate(data):
        for row in rows[index % len(rows) :] + rows[: index % len(rows)]:  # rotate who goes first
            seconds[row].append(step(*models[row], batch))
    median = {row: statistics.median(times[1:] or times) for row, times in seconds.items()}
    reference = median.get("full")
    print(f"{args.image_size} px, batch {args.batch_size}, {args.rounds} rounds, {torch.get_num_threads()} threads\n")
    print("| strategy | trainable params | s/step | images/s | speed vs full | activation MiB | memory vs full |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        model = models[row][0]
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        speed = f"{reference / median[row]:.2f}" if reference else "n/a"
        mem = f"{memory[row] / memory['full']:.2f}" if "full" in memory else "n/a"
        print(
            f"| {row} | {trainable:,} | {median[row]:.2f} | {args.batch_size / median[row]:.2f} | {speed} | "
            f"{memory[row] / 2**20:.0f} | {mem} |"
        )


if __name__ == "__main__":
    main()
