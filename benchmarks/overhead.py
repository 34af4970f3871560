"""Training-step throughput of cvft's ImageClassifier against a plain PyTorch loop on the same timm model.

Both sides train the same architecture from the same initial weights on the same in-memory batches, with AdamW and
cross-entropy. cvft runs through ``lightning.Trainer.fit`` with its metrics, logging, named param groups and
strategies; the baseline is a hand-written loop. Rounds alternate (cvft, plain, cvft, plain ...) so that drift on a
shared machine hits both sides alike, and the table reports the median images/s ratio over rounds.

    python benchmarks/overhead.py                                  # resnet18 @ 128px, 5 rounds
    python benchmarks/overhead.py --model tf_efficientnet_lite0 --image-size 160 --rounds 7

Target: ratio >= 0.95 for full fine-tuning and for linear probing.
"""

from __future__ import annotations

import argparse
import logging
import resource
import statistics
import time
import warnings

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from cvft.tasks import ImageClassifier


class _StepTimer(pl.Callback):
    """Wall time from the start of batch ``skip`` to the end of the last batch."""

    def __init__(self, skip: int) -> None:
        self.skip = skip
        self.start = 0.0
        self.end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.skip:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end = time.perf_counter()


def _loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False)


def cvft_images_per_second(args, strategy, state, loader, steps) -> float:
    model = ImageClassifier(
        args.model, pretrained=False, num_classes=args.classes, strategies=strategy, lr=1e-3, warmup_epochs=0
    )
    model.backbone.load_state_dict(state)
    timer = _StepTimer(args.warmup)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, loader)
    return (steps - args.warmup) * args.batch_size / (timer.end - timer.start)


def plain_images_per_second(args, strategy, state, loader, steps) -> float:
    model = timm.create_model(args.model, num_classes=args.classes)
    model.load_state_dict(state)
    model.train()
    if strategy == "linear_probe":
        model.requires_grad_(False)
        model.get_classifier().requires_grad_(True)
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    start = 0.0
    for index, (images, labels) in enumerate(loader):
        if index == steps:
            break
        if index == args.warmup:
            start = time.perf_counter()
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (steps - args.warmup) * args.batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=12, help="training steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="steps excluded from timing")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--strategies", nargs="+", default=["full", "linear_probe"])
    parser.add_argument(
        "--only",
        choices=["cvft", "plain"],
        help="run one side only and print its peak RSS (run each side in its own process to compare memory)",
    )
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("cvft").setLevel(logging.ERROR)
    torch.manual_seed(0)
    count = args.steps * args.batch_size
    images = torch.randn(count, 3, args.image_size, args.image_size)
    labels = torch.randint(0, args.classes, (count,))
    loader = _loader(images, labels, args.batch_size)
    state = timm.create_model(args.model, num_classes=args.classes).state_dict()

    print(
        f"model {args.model} @ {args.image_size}px, batch {args.batch_size}, {args.steps} steps "
        f"({args.warmup} warmup), {args.rounds} rounds, torch threads {torch.get_num_threads()}"
    )
    if args.only:
        side = cvft_images_per_second if args.only == "cvft" else plain_images_per_second
        for strategy in args.strategies:
            rates = [side(args, strategy, state, loader, args.steps) for _ in range(args.rounds)]
            peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"{args.only} {strategy}: median {statistics.median(rates):.1f} img/s, peak RSS {peak_mib:.0f} MiB")
        return {}
    print(f"{'strategy':<14}{'cvft img/s':>12}{'plain img/s':>13}{'median ratio':>14}{'min':>7}{'max':>7}")
    ratios_by_strategy: dict[str, float] = {}
    for strategy in args.strategies:
        cvft_rates, plain_rates, ratios = [], [], []
        for _ in range(args.rounds):
            cvft_rate = cvft_images_per_second(args, strategy, state, loader, args.steps)
            plain_rate = plain_images_per_second(args, strategy, state, loader, args.steps)
            cvft_rates.append(cvft_rate)
            plain_rates.append(plain_rate)
            ratios.append(cvft_rate / plain_rate)
        median = statistics.median(ratios)
        ratios_by_strategy[strategy] = median
        print(
            f"{strategy:<14}{statistics.median(cvft_rates):>12.1f}{statistics.median(plain_rates):>13.1f}"
            f"{median:>14.3f}{min(ratios):>7.3f}{max(ratios):>7.3f}"
        )
    return ratios_by_strategy


if __name__ == "__main__":
    main()
