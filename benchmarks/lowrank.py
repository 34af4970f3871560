"""cvft's LoRA against HF PEFT's LoRA on the same timm models, side by side in one process.

For each model, both sides adapt the same layers with the same rank and alpha, start from the same weights and
train on the same batches (AdamW, cross-entropy). Rounds alternate cvft / PEFT, and the table reports medians:

* training images/s and its ratio cvft / PEFT (target >= 1.0);
* activation memory of one training step: bytes of the tensors autograd saves for backward (measured with
  ``torch.autograd.graph.saved_tensors_hooks``, deterministic on CPU), cvft / PEFT (target <= 1.0), and against full
  fine-tuning of the plain model (target on ResNet-50: <= 1.0);
* inference images/s of cvft's merged, exported model against the plain timm model (target >= 0.98).

    pip install peft
    python benchmarks/lowrank.py                      # vit_small_patch16_224 @ 224 and resnet50 @ 128
    python benchmarks/lowrank.py --rounds 3 --steps 4
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable
from functools import partial

import timm
import torch
import torch.nn.functional as F

from cvft.strategies import apply_strategies, export_plain_model

MODELS = {
    # name: (image size, cvft targets, PEFT target_modules regex)
    "vit_small_patch16_224": (224, r".*attn\.(qkv|proj)", r".*attn\.(qkv|proj)"),
    "resnet50": (128, "resnet_blocks", r"layer\d\.\d+\.conv[123]"),
}


def saved_activation_bytes(model: torch.nn.Module, loss_of: Callable[[], torch.Tensor]) -> int:
    """Bytes of distinct tensors autograd keeps for backward in one training step (parameters excluded).

    ``loss_of()`` runs the model's forward and returns the loss; the step's backward runs here.
    """
    parameters = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.data_ptr() not in parameters:
            seen[tensor.data_ptr()] = max(seen.get(tensor.data_ptr(), 0), tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_of()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def classification_loss(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``model`` on one batch."""
    return F.cross_entropy(model(images), targets)


def train_images_per_second(model, batches, warmup: int) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    start = 0.0
    for index, (images, targets) in enumerate(batches):
        if index == warmup:
            start = time.perf_counter()
        loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (len(batches) - warmup) * len(batches[0][0]) / (time.perf_counter() - start)


@torch.inference_mode()
def inference_images_per_second(model, images, repeats: int) -> float:
    model.eval()
    model(images)
    start = time.perf_counter()
    for _ in range(repeats):
        model(images)
    return repeats * len(images) / (time.perf_counter() - start)


def build_sides(name: str, rank: int, alpha: int, classes: int):
    from peft import LoraConfig, get_peft_model

    size, cvft_targets, peft_targets = MODELS[name]
    torch.manual_seed(0)
    plain = timm.create_model(name, num_classes=classes)
    head = [n for n, _ in plain.named_modules() if n in ("head", "fc")]
    ours = copy.deepcopy(plain)
    apply_strategies(ours, [{"name": "lora", "rank": rank, "alpha": alpha, "targets": cvft_targets}])
    theirs = get_peft_model(
        copy.deepcopy(plain),
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=peft_targets, modules_to_save=head, lora_dropout=0.0),
    )
    return plain, ours, theirs, size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=16)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    print(f"torch threads {torch.get_num_threads()}, batch {args.batch_size}, rank {args.rank}, {args.rounds} rounds")
    header = f"{'model':<24}{'train cvft/PEFT':>16}{'act. mem cvft/PEFT':>20}{'act. mem cvft/full':>20}"
    print(header + f"{'merged infer/plain':>20}")
    for name in args.models:
        plain, ours, theirs, size = build_sides(name, args.rank, args.alpha, classes=10)
        torch.manual_seed(1)
        batches = [
            (torch.randn(args.batch_size, 3, size, size), torch.randint(0, 10, (args.batch_size,)))
            for _ in range(args.steps)
        ]
        images, targets = batches[0]
        memory_ours = saved_activation_bytes(ours, partial(classification_loss, ours, images, targets))
        memory_theirs = saved_activation_bytes(theirs, partial(classification_loss, theirs, images, targets))
        memory_full = saved_activation_bytes(plain, partial(classification_loss, plain, images, targets))
        train_ratios, infer_ratios = [], []
        merged = export_plain_model(copy.deepcopy(ours))
        for _ in range(args.rounds):
            cvft_rate = train_images_per_second(ours, batches, args.warmup)
            peft_rate = train_images_per_second(theirs, batches, args.warmup)
            train_ratios.append(cvft_rate / peft_rate)
            merged_rate = inference_images_per_second(merged, images, repeats=3)
            plain_rate = inference_images_per_second(plain, images, repeats=3)
            infer_ratios.append(merged_rate / plain_rate)
        print(
            f"{name:<24}{statistics.median(train_ratios):>16.3f}{memory_ours / memory_theirs:>20.3f}"
            f"{memory_ours / memory_full:>20.3f}{statistics.median(infer_ratios):>20.3f}"
        )
        print(
            f"{'':<24}  activation MiB: cvft {memory_ours / 2**20:.0f}, PEFT {memory_theirs / 2**20:.0f}, "
            f"full fine-tune {memory_full / 2**20:.0f}; train ratio range "
            f"{min(train_ratios):.3f}-{max(train_ratios):.3f}"
        )


if __name__ == "__main__":
    main()
