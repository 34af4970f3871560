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

from cvft.strategies import build_param_groups
from cvft.tasks import ImageClassifier

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


def fresh_model(name: str, **kwargs) -> nn.Module:
    """A timm model as built from its definition (the ViT for 32x32 inputs), without touching the random seed."""
    size = {"img_size": IMAGE_SIZE} if name == "test_vit" else {}
    return timm.create_model(name, pretrained=False, **size, **kwargs)


def make_backbone(name: str, seed: int = 0, num_classes: int = NUM_CLASSES) -> nn.Module:
    """A randomly initialised tiny timm model; the ViT is built for 32x32 inputs."""
    torch.manual_seed(seed)
    return fresh_model(name, num_classes=num_classes)


def seeded_classifier(spec, backbone: str = "test_resnet", seed: int = 0) -> ImageClassifier:
    """An ``ImageClassifier`` (lr 1e-2, no warm-up) with the one strategy ``spec``, built right after seeding."""
    torch.manual_seed(seed)
    return ImageClassifier(
        backbone, pretrained=False, num_classes=NUM_CLASSES, strategies=[spec], lr=1e-2, warmup_epochs=0
    )


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


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Linear and Conv2d layers of a plain timm model outside its classifier head, in model order."""
    head = model.get_classifier()
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m is not head}


def top_over_tensors(scores: dict[str, torch.Tensor], count: int, what: str) -> dict[str, set[int]]:
    """The ``count`` largest scores over all tensors together, as per-tensor sets of flat indices.

    The ``count``-th must be strictly larger than the next (a tie would make the reference ambiguous): ``what`` names
    the boundary in the failure message.
    """
    flat = torch.cat([s.flatten() for s in scores.values()])
    ordered = flat.sort(descending=True).values
    assert ordered[count - 1] > ordered[count], f"tie at the {what} boundary: the reference would be ambiguous"
    chosen = set(flat.topk(count).indices.tolist())
    result, offset = {}, 0
    for name, score in scores.items():
        result[name] = {i - offset for i in chosen if offset <= i < offset + score.numel()}
        offset += score.numel()
    return result


def adamw_steps(model: nn.Module, steps: int = 3, weight_decay: float = 0.1, lr: float = 1e-2) -> None:
    """AdamW steps with weight decay on :func:`toy_task`, every parameter in the optimizer (frozen ones included)."""
    optimizer = torch.optim.AdamW(build_param_groups(model, lr, weight_decay), lr=lr)
    images, targets = toy_task(8)
    for _ in range(steps):
        model.train()
        loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def assert_merge_round_trip(model: nn.Module, layers, merge, unmerge, images: torch.Tensor, every_base_moves: bool):
    """Merging (twice: the second is a no-op) keeps the output and moves the base weights of ``layers(model)``
    (every one, or at least one); unmerging restores them. Returns the unmerged output."""
    bases = {name: layer.base.weight.detach().clone() for name, layer in layers(model).items()}
    with torch.no_grad():
        unmerged = model(images)
        merge(model)
        merge(model)  # merging twice is a no-op
        merged = model(images)
    assert all(layer.merged for layer in layers(model).values())
    assert (merged - unmerged).abs().max() < 1e-5
    moved = [not torch.equal(layer.base.weight, bases[n]) for n, layer in layers(model).items()]
    assert all(moved) if every_base_moves else any(moved)
    unmerge(model)
    for name, layer in layers(model).items():
        assert not layer.merged
        torch.testing.assert_close(layer.base.weight, bases[name], rtol=0, atol=1e-6)
    return unmerged


def assert_loads_into_plain_timm(exported: nn.Module, model_name: str, expected: torch.Tensor, images: torch.Tensor):
    """``exported`` loads strictly into a plain timm ``model_name`` that then computes ``expected``."""
    plain = fresh_model(model_name, num_classes=NUM_CLASSES).eval()
    plain.load_state_dict(exported.state_dict(), strict=True)
    with torch.no_grad():
        assert (plain(images) - expected).abs().max() < 1e-5


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
