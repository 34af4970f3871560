"""Shared pieces for the strategy tests: tiny models, a learnable toy task, a foreign LightningModule.

The model descriptions here are written out by hand from the architectures of timm's ``test_vit`` and
``test_resnet`` so that the tests compute expected parameter sets independently of ``cvft.backbones.layer_groups``.
"""

from __future__ import annotations

from collections.abc import Iterable

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from quiet_trainer import make_trainer  # noqa: F401 - the strategy tests take the one trainer factory from here
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

MODELS = ["test_vit", "test_resnet"]
NUM_CLASSES = 4
IMAGE_SIZE = 32

#: Layer groups below the head, stem first, as parameter-name prefixes (hand-written, not from cvft).
BODY_PREFIXES: dict[str, list[tuple[str, ...]]] = {
    "test_vit": [
        ("cls_token", "pos_embed", "patch_embed."),
        *[(f"blocks.{i}.",) for i in range(5)],
        ("blocks.5.", "norm."),
    ],
    "test_resnet": [("conv1.", "bn1."), ("layer1.",), ("layer2.",), ("layer3.",), ("layer4.",)],
}

_COLOURS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0]])


def make_backbone(name: str, seed: int = 0, num_classes: int = NUM_CLASSES) -> nn.Module:
    """A randomly initialised tiny timm model; the ViT is built for 32x32 inputs."""
    torch.manual_seed(seed)
    kwargs = {"img_size": IMAGE_SIZE} if name == "test_vit" else {}
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def toy_task(n: int = 32, seed: int = 0, noise: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class is a per-class mean colour plus a class-dependent stripe, with Gaussian noise."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % NUM_CLASSES
    images = _COLOURS[targets][:, :, None, None].repeat(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    for cls in range(NUM_CLASSES):
        rows = slice(cls * IMAGE_SIZE // NUM_CLASSES, (cls + 1) * IMAGE_SIZE // NUM_CLASSES)
        images[targets == cls, :, rows, :] += 1.0
    images = images + noise * torch.randn(images.shape, generator=generator)
    return images, targets


def toy_loader(n: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    """A deterministic, non-shuffled loader over :func:`toy_task`."""
    images, targets = toy_task(n, seed)
    return DataLoader(TensorDataset(images, targets), batch_size=batch_size, shuffle=False)


def names_with_prefixes(model: nn.Module, prefixes: Iterable[str]) -> set[str]:
    prefixes = tuple(prefixes)
    return {name for name, _ in model.named_parameters() if name.startswith(prefixes)}


def head_names(model: nn.Module) -> set[str]:
    """Parameters under the module path of ``model.get_classifier()``."""
    head = model.get_classifier()
    prefix = next(name for name, module in model.named_modules() if module is head)
    return names_with_prefixes(model, [prefix + "."])


def body_group(model_name: str, model: nn.Module, index: int) -> set[str]:
    return names_with_prefixes(model, BODY_PREFIXES[model_name][index])


def batchnorm_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def module_parameter_names(model: nn.Module, types: tuple[type[nn.Module], ...]) -> set[str]:
    """Names of the parameters held directly by modules of the given types."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, types):
            names |= {f"{module_name}.{n}" for n, _ in module.named_parameters(recurse=False)}
    return names


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def dense(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor view of ``value``: quantised (NF4) weights are compared through their dequantised values."""
    dequantize = getattr(value, "get_original_weight", None)
    return dequantize() if callable(dequantize) else value


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer."""
    return {name: dense(value.detach()).clone() for name, value in model.state_dict().items()}


def bn_stats(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    return {
        name: [m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()]
        for name, m in batchnorm_modules(model).items()
    }


class LossRecorder(pl.Callback):
    """Collects the training loss of every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


class StopAfterEpochs(pl.Callback):
    """Ends a run after ``epochs`` epochs without changing ``max_epochs`` (so LR schedules stay the same)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


class ForeignClassifier(pl.LightningModule):
    """Someone else's LightningModule: its optimizer only receives the parameters trainable at that time."""

    def __init__(
        self,
        backbone: str = "test_resnet",
        lr: float = 1e-2,
        optimizer: str = "adamw",
        scheduler: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.net = make_backbone(backbone, seed)
        self.lr = lr
        self.optimizer_name = optimizer
        self.scheduler_name = scheduler

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch, batch_idx):
        images, targets = batch
        return F.cross_entropy(self(images), targets)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "sgd":
            optimizer = torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        else:
            optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.05)
        if self.scheduler_name is None:
            return optimizer
        if self.scheduler_name == "lambda":
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5**epoch)
        elif self.scheduler_name == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        else:
            raise ValueError(self.scheduler_name)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
