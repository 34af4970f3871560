"""The loop a user writes by hand: timm + PyTorch (+ HF PEFT for LoRA) fine-tuning, no cvft import.

Data: a MedMNIST ``.npz`` (official train / val / test arrays) or an image folder with ``train/``, ``val/`` and
``test/`` class folders. Methods: full fine-tuning, a linear probe (head only, BatchNorm statistics frozen), BitFit
(biases + head) or LoRA through HF PEFT (``r=8``, ``alpha=16`` on the pointwise 1x1 convolutions of the blocks,
head trained in full, as PEFT's image-classification guide does). AdamW with a cosine schedule, validation every
epoch, test accuracy and AUROC of the final model at the end. In-memory data is decoded and resized once, as a
careful user would. Prints one JSON line with the metrics, the trainable share and the wall time.

    python benchmarks/plain_loop.py --npz ../shared/assets/medmnist_28/breastmnist.npz \
        --weights ../shared/assets/efficientnet_lite0_imagenet/tf_efficientnet_lite0.timm.safetensors
"""

from __future__ import annotations

import argparse
import json
import time

START = time.perf_counter()

import numpy as np  # noqa: E402  (imports are part of what a user's process pays for)
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from torchmetrics.functional.classification import multiclass_auroc  # noqa: E402


def load_split(data, split: str, size: int, mean, std) -> TensorDataset:
    x = torch.from_numpy(data[f"{split}_images"]).float().div(255.0)
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2).mean(1, keepdim=True)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return TensorDataset(x, torch.from_numpy(data[f"{split}_labels"].reshape(-1).astype(np.int64)))


def folder_splits(root: str, size: int, mean, std, augment: str):
    """ImageFolder train / val / test; evaluation images resized to ``size``, training ones as ``augment`` says."""
    from torchvision import datasets, transforms

    plain = transforms.Compose(
        [
            transforms.Lambda(lambda image: image.convert("RGB")),
            transforms.Resize((size, size)),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    train_tf = plain
    if augment == "timm":  # what timm's training script uses: random resized crop, flip, colour jitter
        train_tf = timm.data.create_transform(size, is_training=True, mean=mean, std=std)
        train_tf.transforms.insert(0, transforms.Lambda(lambda image: image.convert("RGB")))
    train = datasets.ImageFolder(f"{root}/train", transform=train_tf)
    val, test = (datasets.ImageFolder(f"{root}/{s}", transform=plain) for s in ("val", "test"))
    if augment == "none":  # decode once, keep in memory
        train, val, test = (_in_memory(d) for d in (train, val, test))
    return train, val, test


def _in_memory(dataset) -> TensorDataset:
    images, labels = zip(*[(x, torch.tensor(y)) for x, y in dataset], strict=True)
    return TensorDataset(torch.stack(images), torch.stack(labels))


def evaluate(model, loader) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits, labels = zip(*[(model(x), y) for x, y in loader], strict=True)
    logits, labels = torch.cat(logits), torch.cat(labels)
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    return accuracy, multiclass_auroc(logits.softmax(1), labels, num_classes=logits.shape[1]).item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--npz", help="MedMNIST .npz with train/val/test arrays")
    parser.add_argument("--folder", help="image folder with train/, val/ and test/ class folders")
    parser.add_argument("--augment", choices=["none", "timm"], default="none", help="training augmentation (folders)")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--method", choices=["full", "linear_probe", "bitfit", "lora"], default="full")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-test", action="store_true", help="skip the test split (to match a bare `cvft fit`)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    probe = timm.create_model(args.model, pretrained=False, num_classes=0)
    mean, std = probe.pretrained_cfg["mean"], probe.pretrained_cfg["std"]
    if args.npz:
        data = np.load(args.npz)
        train, val, test = (load_split(data, s, args.image_size, mean, std) for s in ("train", "val", "test"))
        classes = int(data["train_labels"].max()) + 1
    else:
        train, val, test = folder_splits(args.folder, args.image_size, mean, std, args.augment)
        classes = int(max(int(y) for _, y in train)) + 1 if isinstance(train, TensorDataset) else len(train.classes)
    model = timm.create_model(args.model, num_classes=classes)
    state = {k: v for k, v in load_file(args.weights).items() if not k.startswith(model.default_cfg["classifier"])}
    model.load_state_dict(state, strict=False)
    head = model.get_classifier()
    if args.method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=8, lora_alpha=16, target_modules=r".*blocks\..*\.(conv_pw|conv_pwl)", modules_to_save=["classifier"]
        )
        model = get_peft_model(model, config)
    elif args.method != "full":
        for name, p in model.named_parameters():
            p.requires_grad = any(p is q for q in head.parameters()) or (
                args.method == "bitfit" and name.endswith("bias")
            )
    params = [p for p in model.parameters() if p.requires_grad]
    trainable, total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    workers = 0 if isinstance(train, TensorDataset) else 2
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, num_workers=workers)
    steps = args.epochs * len(train_loader)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    val_loader, test_loader = (DataLoader(d, batch_size=256, num_workers=workers) for d in (val, test))
    for _ in range(args.epochs):
        model.train()
        if args.method == "linear_probe":  # frozen backbone: BatchNorm statistics stay those of the weights
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
        for x, y in train_loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        val_acc, val_auroc = evaluate(model, val_loader)
    test_acc, test_auroc = (float("nan"), float("nan")) if args.no_test else evaluate(model, test_loader)
    print(
        json.dumps(
            {
                "method": args.method,
                "seed": args.seed,
                "val_acc": val_acc,
                "val_auroc": val_auroc,
                "test_acc": test_acc,
                "test_auroc": test_auroc,
                "trainable_share": trainable / total,
                "train_images": args.epochs * len(train),
                "wall_s": time.perf_counter() - START,
            }
        )
    )


if __name__ == "__main__":
    main()
